import json

import pytest
import torch
from safetensors.torch import load_file

from medusa_toolkit import HeadsLoadError, MedusaHeads, MedusaModel
from medusa_toolkit.testing.tiny import tiny_base


def test_new_heads_start_as_the_identity_and_layers_have_their_own_weights():
    heads = MedusaHeads(16, 32, num_heads=3, num_layers=2)
    blocks = [heads.heads[0][0].linear, heads.heads[0][1].linear]
    assert blocks[0].weight is not blocks[1].weight  # upstream shares them by accident
    assert all(torch.count_nonzero(b.weight) == 0 for b in blocks)
    lm_head = torch.nn.Linear(16, 32, bias=False)
    heads.init_from_lm_head(lm_head.weight)
    x = torch.randn(2, 5, 16)
    hidden = heads.hidden(x)
    # x + SiLU(0 x + b): identity up to the bias term, computed exactly.
    expected = x + torch.nn.functional.silu(heads.heads[0][0].linear.bias)
    assert torch.allclose(hidden[0], expected + torch.nn.functional.silu(heads.heads[0][1].linear.bias), atol=1e-6)
    assert heads(x).shape == (3, 2, 5, 32)
    with torch.no_grad():
        blocks[0].weight.normal_()
    assert not torch.allclose(heads.hidden(x)[0], heads.hidden(x)[1])


def test_save_load_round_trip_with_upstream_keys(tmp_path):
    heads = MedusaHeads(16, 32, num_heads=2, num_layers=2, base_model_name_or_path="tiny")
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    heads.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "medusa_lm_head.safetensors"))
    assert keys == {f"{i}.{j}.linear.{w}" for i in range(2) for j in range(2) for w in ("weight", "bias")} | {
        "0.2.weight",
        "1.2.weight",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["medusa_num_layers"] == 2
    assert config["hidden_size"] == 16 and config["vocab_size"] == 32
    assert config["head_type"] == "per_head_lm_head" and config["base_model_name_or_path"] == "tiny"
    assert "medusa_toolkit_version" in config
    loaded = MedusaHeads.from_pretrained(tmp_path)
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), heads(x))


def test_shared_lm_head_uses_the_base_projection(tmp_path):
    heads = MedusaHeads(16, 32, num_heads=2, head_type="shared_lm_head")
    lm_head = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(4, 16)
    assert torch.allclose(heads(x, lm_head), lm_head(heads.hidden(x)))
    with pytest.raises(ValueError, match="need the base model's lm_head"):
        heads(x)
    heads.save_pretrained(tmp_path)
    assert not any(k.endswith(".1.weight") for k in load_file(tmp_path / "medusa_lm_head.safetensors"))
    loaded = MedusaHeads.from_pretrained(tmp_path)
    assert loaded.head_type == "shared_lm_head" and torch.equal(loaded(x, lm_head), heads(x, lm_head))


def test_heads_for_another_base_are_refused(tmp_path):
    base = tiny_base("llama")
    with pytest.raises(HeadsLoadError, match="hidden_size=32.*the base has hidden_size=64"):
        MedusaModel(base, MedusaHeads(32, 256, 2))
    with pytest.raises(HeadsLoadError, match="not found"):
        MedusaHeads.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadsLoadError, match="no medusa_lm_head.safetensors"):
        MedusaHeads.from_pretrained(tmp_path / "empty")


def test_medusa_model_forward_matches_base():
    base = tiny_base("qwen2")
    heads = MedusaHeads(64, 256, 3)
    heads.init_from_lm_head(base.lm_head.weight)
    model = MedusaModel(base, heads)
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids)
    assert torch.allclose(out.logits, base(ids).logits, atol=1e-5)
    assert out.medusa_logits.shape == (3, 2, 9, 256)
    last = model(ids, logits_to_keep=1)
    assert torch.allclose(last.logits[:, 0], out.logits[:, -1], atol=1e-5)
    assert not any(p.requires_grad for p in model.base.parameters()) and not model.base.training


def test_only_the_first_heads_can_run():
    heads = MedusaHeads(16, 32, num_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 16)
    assert torch.equal(heads(x, num_heads=2), heads(x)[:2])
    assert heads(x, num_heads=0).shape == (0, 2, 32)
