"""Truncated head vocabularies: heads that score only a token_map's tokens decode exactly, save and load in every
layout (vLLM with K-row heads and the map; the TGI layout with full-vocabulary projections), and train on the map
built from the data's most frequent targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.decoding.generate import medusa_generate
from medusa_toolkit.export.formats import write_medusa, write_vllm
from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.pipeline.stages import run_pipeline
from medusa_toolkit.testing.heads import fit_heads
from medusa_toolkit.testing.runs import base_config
from medusa_toolkit.testing.tiny import BRANCHING, fitted, tiny_base, tiny_model_dir
from medusa_toolkit.train.data.stage import frequent_targets
from medusa_toolkit.train.losses import MedusaObjective


def truncate(full: MedusaHeads, token_map: list[int]) -> MedusaHeads:
    """The same heads scoring only token_map's tokens (per-head projections cut to those rows)."""
    c = full.config
    heads = MedusaHeads(c.hidden_size, c.vocab_size, c.medusa_num_heads, c.medusa_num_layers, c.head_type,
                        token_map=token_map)  # fmt: skip
    state = {k: v[token_map] if k.endswith(f".{c.medusa_num_layers}.weight") else v
             for k, v in full.heads.state_dict().items()}  # fmt: skip
    heads.heads.load_state_dict(state)
    return heads.eval()


@pytest.mark.parametrize("head_type", ["per_head_lm_head", "shared_lm_head"])
def test_truncated_heads_score_only_their_map_and_decode_exactly(head_type):
    model, corpus = fitted("llama")
    base = model.base
    full = model.heads if head_type == "per_head_lm_head" else fit_heads(base, 4, 60, 1, head_type="shared_lm_head")
    token_map, _ = frequent_targets([{"input_ids": row.tolist(), "loss_mask": [1] * len(row)} for row in corpus], 24)
    small = MedusaModel(base, truncate(full, token_map))
    hidden = torch.randn(3, base.config.hidden_size)
    got = small.medusa_logits(hidden)
    want = MedusaModel(base, full).medusa_logits(hidden)
    outside = torch.ones(base.config.vocab_size, dtype=torch.bool)
    outside[token_map] = False
    assert torch.allclose(got[..., token_map], want[..., token_map], atol=1e-5)
    assert torch.isneginf(got[..., outside]).all()  # never proposed
    accepted = 0
    for ids in (corpus[0:1, :4], corpus[5:6, :9], torch.tensor([[7, 200, 13]])):
        out = medusa_generate(small, ids, max_new_tokens=40, tree=BRANCHING)
        ref = base.generate(
            ids, do_sample=False, max_new_tokens=40, eos_token_id=None, attention_mask=torch.ones_like(ids)
        )
        assert torch.equal(out.sequences, ref)
        accepted += sum(n - 1 for n in out.accept_lengths)
    assert accepted > 0  # the map holds the text's tokens: the heads still guess right


def test_truncated_heads_round_trip_through_every_layout(tmp_path):
    model, _ = fitted("llama")
    base = model.base
    lm_head = base.lm_head.weight
    token_map = list(range(0, 255, 3)) + [254]
    for head_type in ("per_head_lm_head", "shared_lm_head"):
        full = model.heads if head_type == "per_head_lm_head" else fit_heads(base, 2, 5, 0, head_type=head_type)
        heads = truncate(full, token_map)
        ours = heads.save_pretrained(tmp_path / head_type / "ours")
        vllm = write_vllm(heads, tmp_path / head_type / "vllm", lm_head_weight=lm_head)
        tgi = write_medusa(heads, tmp_path / head_type / "medusa", lm_head_weight=lm_head)
        for folder in (ours, vllm, tgi):
            again = MedusaHeads.from_pretrained(folder)
            assert again.token_map.tolist() == token_map and again.head_type == head_type, folder
            assert again.content_digest() == heads.content_digest(), folder
        cfg = json.loads((vllm / "config.json").read_text())
        tensors = load_file(str(vllm / "model.safetensors"))
        assert cfg["truncated_vocab_size"] == len(token_map) and tensors["token_map"].tolist() == token_map
        assert tensors["lm_heads.0.weight"].shape[0] == len(token_map)  # vLLM: K-row heads spread by token_map
        tgi_weights = load_file(str(tgi / "medusa_lm_head.safetensors"))
        projection = tgi_weights[f"0.{heads.num_layers}.weight"]
        assert projection.shape == lm_head.shape  # TGI / TensorRT-LLM: full-vocabulary projections
        trained = full.heads[0][-1].weight if head_type == "per_head_lm_head" else lm_head
        assert torch.equal(projection[token_map], trained[token_map].detach())
        rest = [t for t in range(256) if t not in token_map]
        assert torch.equal(projection[rest], lm_head[rest].detach())  # the base's rows where the heads learned none
    bad = dict(cfg, truncated_vocab_size=len(token_map) + 1)
    (vllm / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="truncated_vocab_size"):
        MedusaHeads.from_pretrained(vllm)


def test_frequent_targets_rank_trained_positions_and_keep_eos():
    rows = [
        {"input_ids": [9, 9, 9, 9, 5, 5, 1], "loss_mask": [0, 0, 0, 1, 1, 1, 1]},
        {"input_ids": [2, 2, 2], "labels": [3, 3, 3], "loss_mask": [1, 1, 1]},
    ]
    chosen, covered = frequent_targets(rows, 3, always=[7])
    assert chosen == [3, 5, 7]  # 3 (labels, x3) and 5 (x2) beat 9 and 1 (x1 trained); EOS 7 always
    assert covered == pytest.approx(5 / 7)


def test_truncated_objective_is_cross_entropy_over_the_map():
    base = tiny_base("llama", 0)
    token_map = [1, 4, 9, 16, 25, 36]
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 2, token_map=token_map)
    heads.init_from_lm_head(base.lm_head.weight)
    objective = MedusaObjective(heads, base.lm_head.weight)
    hidden = torch.randn(1, 6, base.config.hidden_size)
    targets = torch.tensor([[0, 0, 4, 9, 100, 36]])  # 100 is outside the map: no loss, a miss
    loss, stats = objective(hidden, targets, torch.ones_like(targets))
    logits = heads.heads[0](hidden[0, :4])
    index = torch.tensor([token_map.index(4), token_map.index(9), -1, token_map.index(36)])
    want = torch.nn.functional.cross_entropy(logits, index, ignore_index=-1, reduction="sum") / 4
    assert stats[0, 1] == 4 and stats[0, 2] <= 3
    head1 = torch.nn.functional.cross_entropy(
        heads.heads[1](hidden[0, :3]), torch.tensor([token_map.index(9), -1, token_map.index(36)]),
        ignore_index=-1, reduction="sum",
    ) / 3  # fmt: skip
    assert torch.allclose(loss, want + 0.8 * head1)


def test_training_with_a_truncated_vocabulary(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    raw = base_config(model_dir)
    raw["heads"].update(truncated_vocab_size=40, head_type="shared_lm_head")
    run_pipeline(config_from_dict(raw), tmp_path / "run", ["data", "train"])
    heads = MedusaHeads.from_pretrained(tmp_path / "run" / "heads")
    summary = json.loads((tmp_path / "run" / "heads" / "training_summary.json").read_text())
    assert heads.config.truncated_vocab_size == 40 == len(heads.token_map)
    assert 257 in heads.token_map.tolist()  # EOS of the byte tokenizer is always guessable
    assert 0.0 < summary["truncated_vocab"]["train_targets_covered"] <= 1.0
