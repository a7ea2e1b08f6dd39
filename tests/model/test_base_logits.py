"""One map from last hidden states to the base's logits (lm_head bias, logit scale, soft-cap) for inference and
training: it must equal each family's own forward, and shared heads must project through all of it."""

from __future__ import annotations

import pytest
import torch

from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.medusa_model import BaseHead, MedusaModel
from medusa_toolkit.testing.tiny import tiny_base
from medusa_toolkit.train.losses import MedusaObjective

TINY = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64}
FAMILIES = {
    "gemma2": {"final_logit_softcapping": 0.5, "query_pre_attn_scalar": 8},  # soft-cap (small: it must bite)
    "cohere": {"logit_scale": 0.25},  # logits * scale
    "granite": {"logits_scaling": 4.0},  # logits / scaling
    "phi": {},  # lm_head has a bias
}


def _tiny(family: str):
    model = tiny_base(family, vocab=64, layers=1, head_dim=8, attn="eager", **TINY, **FAMILIES[family])
    lm = model.get_output_embeddings()
    with torch.no_grad():
        lm.weight.mul_(20)  # large logits, so a missing soft-cap or scale is far outside tolerance
        if lm.bias is not None:
            lm.bias.uniform_(-3, 3)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_logits_equal_the_family_forward(family):
    model = _tiny(family)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        hidden = model.get_decoder()(ids).last_hidden_state
    heads = MedusaHeads(32, 64, num_heads=2, head_type="shared_lm_head")
    medusa = MedusaModel(model, heads)
    objective = MedusaObjective(heads, BaseHead.of(model, frozen_copy=True))
    with torch.no_grad():
        torch.testing.assert_close(medusa.base_logits(hidden), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(objective.base_logits(hidden), want, rtol=1e-5, atol=1e-5)
        # Shared heads at inference: the same logit map as training (soft-capped, scaled, biased).
        got = medusa.medusa_logits(hidden)
        expected = torch.stack([objective.project(k, h) for k, h in enumerate(heads.hidden(hidden))])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
