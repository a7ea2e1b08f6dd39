"""Exactness of Medusa greedy decoding: token ids must equal the base model's own greedy generate."""

import pytest
import torch

from medusa_toolkit import MedusaModel, MedusaTree, medusa_generate
from medusa_toolkit.testing.heads import fit_heads, greedy_corpus
from medusa_toolkit.testing.tiny import BRANCHING, fitted, tiny_base

TREES = ["chain-4", BRANCHING, "mc_sim_7b_63"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family_setup(request):
    return fitted(request.param)


@pytest.fixture(scope="module")
def setup():
    return fitted("llama")


def reference(model, ids, max_new_tokens, eos_token_id=None):
    return model.base.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


def prompts(corpus):
    """Prefixes of the heads' training text (long accepted paths) and random prompts (mostly rejected)."""
    g = torch.Generator().manual_seed(7)
    return [
        corpus[0:1, :4],
        corpus[3:4, :17],
        torch.randint(0, 256, (1, 1), generator=g),
        torch.randint(0, 256, (1, 33), generator=g),
    ]


@pytest.mark.parametrize("tree", TREES, ids=["chain", "branching", "mc_sim_7b_63"])
def test_identical_to_greedy(family_setup, tree):
    model, corpus = family_setup
    total_accepted = 0
    for ids in prompts(corpus):
        out = medusa_generate(model, ids, max_new_tokens=64, tree=tree)
        assert torch.equal(out.sequences, reference(model, ids, 64)), f"diverged for prompt length {ids.shape[1]}"
        assert out.new_tokens == 64 == sum(out.accept_lengths) + 1
        total_accepted += sum(n - 1 for n in out.accept_lengths)
    # The heads must really have been used, or this test would not exercise acceptance and cache compaction.
    assert total_accepted > 60


def test_branching_tree_accepts_non_top1_candidates(setup):
    """With a partly trained head, some accepted paths go through rank > 0 nodes; output still exact."""
    model, corpus = setup
    base = model.base
    weak = MedusaModel(base, fit_heads(base, num_heads=4, steps=15, seed=1))
    tree = MedusaTree.from_paths(BRANCHING)
    used_rank = False
    from medusa_toolkit.decoding import generate

    original = generate.accept_greedy

    def spy(tree_tokens, logits, buffers):
        nonlocal used_rank
        step = original(tree_tokens, logits, buffers)
        paths = [(), *tree.paths]
        accepted_nodes = step.nodes[0, : int(step.counts[0])]  # one prompt: row 0
        used_rank |= any(any(r > 0 for r in paths[i]) for i in accepted_nodes.tolist())
        return step

    generate.accept_greedy = spy
    try:
        for ids in prompts(corpus):
            out = medusa_generate(weak, ids, max_new_tokens=48, tree=tree)
            assert torch.equal(out.sequences, reference(weak, ids, 48))
    finally:
        generate.accept_greedy = original
    assert used_rank


def test_max_new_tokens_landing_mid_path(setup):
    model, corpus = setup
    ids = corpus[0:1, :4]
    full = medusa_generate(model, ids, max_new_tokens=40, tree="chain-4")
    boundaries = {1 + sum(full.accept_lengths[:i]) for i in range(len(full.accept_lengths) + 1)}
    mid_path = [n for n in range(1, 30) if n not in boundaries]
    assert mid_path, "the heads accepted nothing, the test would prove nothing"
    for n in list(range(1, 12)) + mid_path[:6]:
        out = medusa_generate(model, ids, max_new_tokens=n, tree="chain-4")
        assert torch.equal(out.sequences, reference(model, ids, n)), n
        assert out.new_tokens == n


def test_eos_inside_an_accepted_path(setup):
    model, corpus = setup
    ids = corpus[2:3, :5]
    full = medusa_generate(model, ids, max_new_tokens=40, tree="chain-4")
    new = full.sequences[0, ids.shape[1] :].tolist()
    ends = [1 + sum(full.accept_lengths[:i]) for i in range(len(full.accept_lengths) + 1)]  # tokens after each step
    # an index j whose token first appears there and is not the last token of its step
    candidates = [j for j in range(1, len(new)) if new[j] not in new[:j] and (j + 1) not in ends]
    assert candidates, "no token stops mid-step; choose another prompt"
    for j in candidates[:3]:
        eos = new[j]
        out = medusa_generate(model, ids, max_new_tokens=40, tree="chain-4", eos_token_id=eos)
        ref = reference(model, ids, 40, eos_token_id=eos)
        assert torch.equal(out.sequences, ref)
        assert out.sequences.shape[1] == ids.shape[1] + j + 1 and out.sequences[0, -1] == eos
    # EOS as the very first token: generate() still emits it
    first = new[0]
    out = medusa_generate(model, ids, max_new_tokens=40, eos_token_id=[999, first])
    assert out.sequences[0, ids.shape[1] :].tolist() == [first] and out.steps == 0


def test_streamer_receives_prompt_then_accepted_tokens(setup):
    model, corpus = setup

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = corpus[1:2, :6]
    streamer = Collect()
    out = medusa_generate(model, ids, max_new_tokens=30, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out.sequences[0, ids.shape[1] :].tolist()
    assert [len(c) for c in streamer.chunks[2:]] == out.accept_lengths


def test_eager_attention_is_exact_too(setup):
    model, corpus = setup
    ids = corpus[4:5, :9]
    out = medusa_generate(model, ids, max_new_tokens=32, tree=BRANCHING, attn_implementation="eager")
    assert torch.equal(out.sequences, reference(model, ids, 32))
    assert model.base.config._attn_implementation == "sdpa"  # restored


def test_bad_arguments():
    base = tiny_base("llama")
    model = MedusaModel(base, fit_heads(base, num_heads=2, steps=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        medusa_generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="depth 4 but the heads number 2"):
        medusa_generate(model, torch.zeros(1, 3, dtype=torch.long), 5, tree="chain-4")
    with pytest.raises(ValueError, match="attn_implementation 'flash'"):
        medusa_generate(model, torch.zeros(1, 3, dtype=torch.long), 5, attn_implementation="flash")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flash_decoding_attention_is_exact(backend):
    """Medusa verification through the Flash-Decoding kernel (compact tree mask) gives the greedy tokens."""
    from medusa_toolkit.kernels.hf_attention import get_backend, set_backend

    # On a CUDA machine the model runs there: the triton backend compiled (there is no interpreter for CPU tensors).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = tiny_base("llama", seed=2, head_dim=64)  # the Triton kernel supports head dims 64/80/96/128
    heads = fit_heads(base, num_heads=4, steps=60, seed=2)
    corpus = greedy_corpus(base, seed=2).to(device)
    model = MedusaModel(base.to(device), heads)
    previous = get_backend()
    set_backend(backend)
    try:
        accepted = 0
        for ids in (corpus[0:1, :5], corpus[5:6, :12]):
            for tree in ("chain-4", BRANCHING):
                out = medusa_generate(model, ids, 24, tree=tree, attn_implementation="medusa_flash_decoding")
                assert torch.equal(out.sequences, reference(model, ids, 24))
                accepted += out.new_tokens - 1 - out.steps
        assert accepted > 10
    finally:
        set_backend(previous)
    assert model.base.config._attn_implementation == "sdpa"


def test_one_node_tree_is_a_plain_greedy_step(setup, monkeypatch):
    """The tuner's fallback (no speculation) runs the base exactly as its own greedy loop does: no tree mask."""
    model, corpus = setup
    masks = []
    decoder = model.base.get_decoder()
    forward = decoder.forward

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    ids = corpus[2:3, :6]
    out = medusa_generate(model, ids, max_new_tokens=24, tree=MedusaTree.from_paths([]))
    steps = list(masks)
    assert torch.equal(out.sequences, reference(model, ids, 24)) and out.accept_lengths == [1] * 23
    assert len(steps) == 24 and all(m is None for m in steps[1:])  # prefill, then 23 unmasked one-token steps
