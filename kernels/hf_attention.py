"""Hook `flash_decode` into transformers as the attention implementation "medusa_tree_decoding" (ATTN_NAME).

The name must not contain "flash": transformers treats any such name as a FlashAttention variant (tries to import
flash-attn kernels in `set_attn_implementation`/`from_pretrained`, and takes FA-only branches in generation/models).

Usage: `AutoModelForCausalLM.from_pretrained(..., attn_implementation=ATTN_NAME)` (or
`model.set_attn_implementation(ATTN_NAME)`) after `register_attention()`.

Contract with the decoding code: extra keyword arguments given to `model(...)` flow through the decoder layers into
the attention function (transformers passes **kwargs down), so the tree reaches the kernel in compact form:
    medusa_tree_mask: bool [T, T] or [B, T, T], or None (causal among the T new tokens)
    medusa_kv_lens:   int [B] (valid cache length per row, new tokens included, on the model's device), or None (all S)
When either key is present the compact description is authoritative and transformers' `attention_mask` is ignored
(so it cannot carry left padding: callers express padding through medusa_kv_lens, right-aligned).
Without them, short queries (T <= MAX_KERNEL_QUERY_LEN) with no explicit mask (plain decoding, short prefill) use
the kernel with causal masking; everything else (long prefill, padded batches, custom 4D masks) goes to transformers'
SDPA path with the usual mask, so results stay exact.

Attention sinks (gpt-oss's `s_aux`) reach the kernel (its reduce step adds them to the softmax denominator); on the
dense path an eager softmax applies them (transformers' SDPA function would drop them). Head dims the kernel does not
compile go to SDPA on CUDA (`flash_decode`'s "auto"), not to a dense fp32 reference.

Per-layer host work is kept small: the tree mask is packed into bit words once per forward (layer 0, or the first
layer that sees a new mask tensor) and reused by the other layers; kv_lens values are checked once per forward (one
device sync, at layer 0); the kernel writes its output in the [B, T, Hq, D] layout transformers continues with.
"""

import os
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .flash_decode import (
    BACKENDS,
    MAX_TREE_NODES,
    PackedTreeMask,
    dense_attention_mask,
    flash_decode,
    pack_tree_mask,
)

ATTN_NAME = "medusa_tree_decoding"  # no "flash" in it: see the module docstring
MAX_KERNEL_QUERY_LEN = 128  # longer queries without tree kwargs are prefill: SDPA/FlashAttention is the better tool
BACKEND_ENV = "MEDUSA_FLASH_DECODE_BACKEND"
TREE_MASK_KWARG = "medusa_tree_mask"
KV_LENS_KWARG = "medusa_kv_lens"

_backend_override: str | None = None


def set_backend(backend: str | None) -> None:
    """Force the flash_decode backend used by the attention function ("auto", "triton", "torch"); None resets.

    Takes precedence over the MEDUSA_FLASH_DECODE_BACKEND environment variable (read at every call).
    """
    global _backend_override
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _backend_override = backend


def get_backend() -> str:
    """The backend the attention function will use: set_backend(...) > $MEDUSA_FLASH_DECODE_BACKEND > "auto"."""
    backend = _backend_override or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not one of {BACKENDS}")
    return backend


def _needs_dense_path(module: torch.nn.Module, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """Features the kernel does not implement: the caller gets the dense (SDPA/eager) path instead."""
    sliding_window = kwargs.get("sliding_window")
    return (
        (dropout > 0.0 and module.training)
        # A window only bites once the cache is longer than it (Mistral passes its window on every call).
        or (sliding_window is not None and key.shape[2] > sliding_window)
        or kwargs.get("softcap") is not None  # Gemma-2 style logit soft-capping
        or kwargs.get("position_bias") is not None
        or kwargs.get("is_causal", getattr(module, "is_causal", True)) is False
    )


def _dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict,
) -> tuple[torch.Tensor, None]:
    """Fallback: SDPA with a dense mask, or an eager softmax when the module asks for logit soft-capping or has
    attention sinks (s_aux, gpt-oss), which transformers' SDPA function does not apply."""
    kwargs = {k: v for k, v in kwargs.items() if k not in (TREE_MASK_KWARG, KV_LENS_KWARG)}
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    if softcap is None and sinks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query.float() @ repeat_kv(key, groups).float().transpose(2, 3) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    if sinks is not None:
        # A sink is one more logit per head in every row's softmax, with no value (what gpt-oss's eager path does).
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = (probs @ repeat_kv(value, groups).float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _merge_masks(compact: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """AND the [B, 1, T, S] bool mask built from the tree kwargs with transformers' own mask (window, padding)."""
    if attention_mask is None:
        return compact
    attention_mask = attention_mask[..., -compact.shape[-1] :]
    if attention_mask.dtype == torch.bool:
        return compact & attention_mask
    return torch.where(compact, attention_mask, torch.finfo(attention_mask.dtype).min)


def medusa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, S, D] (cache included).

    Returns (attn_output [B, T, Hq, D], None) like `sdpa_attention_forward`. See the module docstring for the
    medusa_tree_mask / medusa_kv_lens keyword contract.
    """
    has_tree_kwargs = TREE_MASK_KWARG in kwargs or KV_LENS_KWARG in kwargs
    tree_mask = kwargs.get(TREE_MASK_KWARG)
    kv_lens = kwargs.get(KV_LENS_KWARG)
    T, S = query.shape[2], key.shape[2]

    if _needs_dense_path(module, key, dropout, kwargs):
        if has_tree_kwargs:
            compact = dense_attention_mask(T, S, tree_mask, kv_lens, batch=query.shape[0], device=query.device)
            attention_mask = _merge_masks(compact[:, None], attention_mask)
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs)

    if not has_tree_kwargs:
        if attention_mask is not None or T > MAX_KERNEL_QUERY_LEN:
            # Padding or a custom 4D mask (or a long prefill): transformers' path is exact and fast enough.
            return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if T > 1 and S > T:
            # transformers only drops the mask here for a prefill into an empty static cache: the real keys are
            # the first T (SDPA slices the same way), the rest are unwritten slots.
            key, value = key[:, :, :T], value[:, :, :T]

    layer_idx = getattr(module, "layer_idx", 0)
    if tree_mask is not None and tree_mask.shape[-1] <= MAX_TREE_NODES:
        tree_mask = _packed(tree_mask, layer_idx)
    # Check kv_lens values once per forward (layer 0), not once per layer: each check is a device sync.
    out = flash_decode(
        query, key, value, tree_mask, kv_lens, scale=scaling, backend=get_backend(), check_kv_lens=layer_idx == 0,
        sinks=kwargs.get("s_aux"),
    )  # fmt: skip
    # The kernel's output is stored [B, T, Hq, D] already: this transpose makes it contiguous again, no copy.
    return out.transpose(1, 2).contiguous(), None


# The last packed tree mask and the tensor it came from: the layers of one forward get the same mask tensor.
_last_packed: tuple[weakref.ref, PackedTreeMask] | None = None


def _packed(tree_mask: torch.Tensor, layer_idx: int) -> PackedTreeMask:
    """Pack once per forward: repacked at layer 0 (so a mask edited in place between forwards is seen) and for any
    other tensor than the last one packed."""
    global _last_packed
    if layer_idx != 0 and _last_packed is not None and _last_packed[0]() is tree_mask:
        return _last_packed[1]
    packed = pack_tree_mask(tree_mask)
    _last_packed = (weakref.ref(tree_mask), packed)
    return packed


def register_attention() -> str:
    """Register ATTN_NAME with transformers' attention and mask interfaces (idempotent). Returns the name.

    The mask interface entry is `sdpa_mask`: transformers then builds exactly the masks SDPA gets (None when plain
    causal attention suffices), which the fallback path needs; without an entry the function would get no mask.
    """
    AttentionInterface.register(ATTN_NAME, medusa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
