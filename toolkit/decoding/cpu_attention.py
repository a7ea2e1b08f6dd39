"""SDPA for tree steps on CPU: grouped-query attention stays inside SDPA even when a tree mask is passed.

transformers' `sdpa` lets SDPA handle grouped-query attention (`enable_gqa`) only without a mask; with one it copies
every key/value head `num_key_value_groups` times (`repeat_kv`) in every layer, because CUDA would otherwise fall
back to its math kernel. A Medusa tree step always carries a mask, and on CPU those copies cost as much as a tenth of
a 2-node step of SmolLM2 (3 KV heads for 9 query heads). PyTorch's CPU kernels take the mask and `enable_gqa`
together and give bit-identical outputs (tests/test_cpu_attention.py), so on CPU tree steps run this instead.
Everything else (no mask, one query token, non-grouped heads, other devices) is transformers' own `sdpa`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Avoids the substring "flash", which transformers routes to its FlashAttention code paths.
CPU_SDPA_NAME = "medusa_cpu_sdpa"


def cpu_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward`, except that a masked multi-token grouped-query call on CPU lets SDPA
    broadcast the key/value heads itself instead of materialising `repeat_kv` copies."""
    groups = getattr(module, "num_key_value_groups", 1)
    grouped_masked = attention_mask is not None and groups > 1 and query.shape[2] > 1 and query.device.type == "cpu"
    if not grouped_masked or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def register_cpu_sdpa() -> str:
    """Register CPU_SDPA_NAME with transformers (idempotent); it builds exactly the masks `sdpa` gets. Returns it."""
    AttentionInterface.register(CPU_SDPA_NAME, cpu_sdpa_forward)
    AttentionMaskInterface.register(CPU_SDPA_NAME, sdpa_mask)
    return CPU_SDPA_NAME
