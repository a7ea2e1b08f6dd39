"""The compiled decoding step (decoding.compiled): the same tokens as the eager step, for every tree and batch; GEMM
rows that do not depend on their neighbours; no recompile per step; `off` is today's eager path; latency profiles.

Compiles only tiny shapes (a 2-layer model), once per module: tens of seconds on two cores.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from medusa_toolkit import MedusaTree, medusa_generate, medusa_generate_batch
from medusa_toolkit.decoding import compiled
from medusa_toolkit.decoding.latency_profile import LatencyProfile, LatencyProfileError, model_signature
from medusa_toolkit.testing.tiny import BRANCHING, fitted
from medusa_toolkit.tuning.calibration import Calibration, count_paths
from medusa_toolkit.tuning.timing import profile_trees
from medusa_toolkit.tuning.tune import choose_tree


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    """(eager model, the same weights decoding through the compiled step, corpus)."""
    model, corpus = fitted(request.param, sharpen=True)
    eager = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    assert compiled.compile_decoding(twin, "on") and twin.compiled
    return eager, twin, corpus


def trees_for(num_heads: int) -> list[MedusaTree]:
    """The 1-node tree (greedy), a chain, and a branching tree as deep as the heads: a graph of the heads per depth
    is compiled, so every depth would add compile time, not coverage."""
    return [MedusaTree.chain(0), MedusaTree.chain(2), MedusaTree.from_paths(BRANCHING)]


def batch(corpus: torch.Tensor, first: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` prompts of different lengths from the corpus, left-padded: ids and attention mask."""
    prompts = [corpus[first + i, : 5 + 3 * i].tolist() for i in range(rows)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# Every decode below runs a batch of 2 (one compiled graph for trees, one for single-token steps) except the
# single-prompt greedy test: each shape family costs tens of seconds of compile and autotune on two cores.


def test_compiled_step_gives_the_eager_steps_tokens_for_every_tree_in_a_batch(pair):
    eager, twin, corpus = pair
    ids, mask = batch(corpus, 3)
    for tree in trees_for(twin.num_heads):
        ref = medusa_generate_batch(eager, ids, mask, 24, tree=tree, eos_token_id=[])
        out = medusa_generate_batch(twin, ids, mask, 24, tree=tree, eos_token_id=[])
        assert [r.tolist() for r in out.rows()] == [r.tolist() for r in ref.rows()], tree.name


def test_a_long_decode_compiles_no_new_graph(pair):
    """Dynamic shapes: KV length and tree size change every step without a recompile."""
    _, twin, corpus = pair
    tree = MedusaTree.from_paths(BRANCHING)
    medusa_generate_batch(twin, *batch(corpus, 5), 8, tree=tree, eos_token_id=[])  # every graph this tree needs
    medusa_generate_batch(twin, *batch(corpus, 5), 8, tree=MedusaTree.chain(2), eos_token_id=[])
    before = compiled.recompiles()
    medusa_generate_batch(twin, *batch(corpus, 6), 64, tree=tree, eos_token_id=[])
    medusa_generate_batch(twin, *batch(corpus, 7), 16, tree=MedusaTree.chain(2), eos_token_id=[])
    assert compiled.recompiles() == before


def test_one_prompt_greedy_and_the_one_node_tree_share_one_graph(pair):
    """A single prompt's greedy decode (the verifier's same-path reference, the data stage's answers) gives the
    eager tokens; the tuner's fallback (the 1-node tree) runs that same graph: nothing extra to compile."""
    from medusa_toolkit.decoding.generate import greedy_generate_batch

    eager, twin, corpus = pair
    prompt = corpus[7, :5][None]
    ref = greedy_generate_batch(eager, prompt, None, 12, eos_token_id=[])
    assert greedy_generate_batch(twin, prompt, None, 12, eos_token_id=[]) == ref and len(ref[0]) == 12
    before = compiled.recompiles()
    out = medusa_generate(twin, prompt, 12, tree=MedusaTree.chain(0), eos_token_id=[])
    assert compiled.recompiles() == before
    assert out.sequences[0, 5:].tolist() == ref[0]


def test_compiled_gemm_rows_do_not_depend_on_their_neighbours():
    """The C++ GEMM template: row i of an M-row product is bitwise the same for every M >= 2 (random M). A one-row
    product is not among them: torch.compile specialises size 1 into a graph of its own (benchmarks/RESULTS.md)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40)).eval()
    for p in mlp.parameters():
        p.requires_grad_(False)
    fn = compiled._with_options(torch.compile(mlp.forward, dynamic=True))
    x = torch.randn(24, 48)
    with torch.inference_mode():
        full = fn(x)
        for m in random.Random(0).sample(range(2, 24), 6):
            assert torch.equal(fn(x[:m]), full[:m]), m
            assert torch.equal(fn(x[24 - m :]), full[24 - m :]), m  # a row's result does not depend on its index


def test_compile_off_is_the_eager_path(pair):
    eager, _, _ = pair
    model = copy.deepcopy(eager)
    assert not compiled.compile_decoding(model, "off")
    assert model.step_fn == model.step and model.heads_fn == model.medusa_logits and not model.compiled


def test_auto_leaves_small_bases_eager_and_on_says_why_not(pair):
    eager, _, _ = pair
    wanted, why = compiled.decide(eager, "auto", "sdpa")
    assert not wanted and "faster eager" in why
    with pytest.raises(compiled.CompileError, match="Flash-Decoding"):
        compiled.decide(eager, "on", "medusa_flash_decoding")


def test_auto_compiles_one_row_at_a_time_not_the_data_stages_batches(pair, monkeypatch):
    eager, _, _ = pair
    monkeypatch.setattr(compiled, "AUTO_MIN_WEIGHT_BYTES", 0)  # as if the tiny base were SmolLM2-sized
    wanted, why = compiled.decide(eager, "auto", "sdpa", batch_size=1)
    assert not wanted and "6-9 min in every process" in why  # auto is eager until a compile is paid once per machine
    monkeypatch.setattr(compiled, "AUTO_COMPILES", True)
    assert compiled.decide(eager, "auto", "sdpa", batch_size=1)[0]
    wanted, why = compiled.decide(eager, "auto", "sdpa", batch_size=64)
    assert not wanted and "batches of 64" in why
    assert compiled.decide(eager, "on", "sdpa", batch_size=64)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Latency profiles: measured on one machine, tuning for it on another


def _calibration() -> Calibration:
    g = torch.Generator().manual_seed(3)
    weights = torch.tensor([0.5, 0.25, 0.125, 0.6])
    ranks = torch.multinomial(weights, 400 * 3, replacement=True, generator=g).view(400, 3)
    counts, rank_counts = count_paths(ranks, 3)
    return Calibration(counts, rank_counts, 400, 400, 3, 3)


def _profile(model, slope: float) -> LatencyProfile:
    nodes = [1, 2, 4, 8, 16]
    return LatencyProfile(nodes, [0.01 * (1 + slope * (n - 1)) for n in nodes], [0.0] * 5, {"device": "elsewhere"},
                          model_signature(model), {"batch_size": 1})  # fmt: skip


def test_a_latency_profile_round_trips_and_decides_the_tree(pair, tmp_path):
    eager, _, _ = pair
    calib = _calibration()
    flat, steep = _profile(eager, 0.01), _profile(eager, 1.0)
    path = flat.save(tmp_path / "flat.json")
    assert LatencyProfile.load(path) == flat
    wide = choose_tree(eager, calib, 16, profile=LatencyProfile.load(path))
    narrow = choose_tree(eager, calib, 16, profile=steep)
    # Cheap wide steps buy a bigger tree; steps that cost one step per node make a tree not worth it.
    assert wide.tree.num_nodes > narrow.tree.num_nodes and narrow.tree.num_nodes == 1
    path.write_text(json.dumps({**json.loads(path.read_text()), "signature": {"hidden_size": 4096}}))
    with pytest.raises(LatencyProfileError, match="another model"):
        LatencyProfile.load(path).check_fits(eager, str(path))
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(LatencyProfileError, match="not a latency profile"):
        LatencyProfile.load(tmp_path / "bad.json")


def test_profile_trees_are_as_deep_as_the_heads_allow():
    trees = profile_trees(3, [1, 2, 4, 8])
    assert {n: (t.num_nodes, t.depth) for n, t in trees.items()} == {1: (1, 0), 2: (2, 1), 4: (4, 3), 8: (8, 3)}
