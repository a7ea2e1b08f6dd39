"""Load Medusa heads from any layout we know: ours/upstream (`medusa_lm_head.safetensors`), upstream's legacy
`medusa_lm_head.pt` (only through `torch.load(weights_only=True)`, never plain unpickling) and vLLM's layout.

The weights are the truth: when a config.json disagrees with them about the number of heads or layers (upstream Hub
configs often do), we warn and use what the weights hold.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from medusa_toolkit.heads import (
    WEIGHTS_NAME,
    HeadsLoadError,
    MedusaHeads,
    read_heads_config,
    resolve_heads_folder,
    warn_config_mismatch,
)

LEGACY_WEIGHTS_NAME = "medusa_lm_head.pt"
_VLLM_KEY = re.compile(r"^(?:blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)|lm_heads\.(\d+)\.weight)$")


def heads_from_vllm_tensors(tensors: dict[str, torch.Tensor], cfg: dict, source: str) -> MedusaHeads:
    """Build heads from vLLM-layout tensors (`blocks.{i}.layers.{j}.*`, `lm_heads.{i}.weight`)."""
    tensors = {k.removeprefix("medusa_heads."): v for k, v in tensors.items() if k != "token_map"}
    converted: dict[str, torch.Tensor] = {}
    lm_heads: dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _VLLM_KEY.match(key)
        if m is None:
            raise HeadsLoadError(
                f"{source}: unexpected key {key!r} in vLLM Medusa weights (expected blocks.{{h}}.layers.{{l}}.weight)"
            )
        if m.group(4) is not None:
            lm_heads[int(m.group(4))] = value
        else:
            converted[f"{m.group(1)}.{m.group(2)}.linear.{m.group(3)}"] = value
    block_heads = {int(k.split(".")[0]) for k in converted}
    num_heads = max(block_heads | set(lm_heads), default=-1) + 1
    num_layers = max((int(k.split(".")[1]) for k in converted), default=-1) + 1
    if num_heads == 0:
        raise HeadsLoadError(f"{source}: the vLLM Medusa weights file is empty")
    if cfg.get("truncated_vocab_size") not in (None, cfg.get("vocab_size")):
        raise HeadsLoadError(
            f"{source}: truncated-vocabulary vLLM heads (token_map) are not supported; export full-vocabulary heads"
        )
    if not cfg.get("medusa_fc_bias", False) and any(k.endswith(".bias") for k in converted):
        warnings.warn(
            f"{source}: config.json lacks medusa_fc_bias: true, so vLLM would drop these biases; loading them",
            stacklevel=2,
        )
    for i in range(num_heads):  # vLLM's layers may have no bias at all: that is a zero bias
        for j in range(num_layers):
            w = converted.get(f"{i}.{j}.linear.weight")
            if w is not None:
                converted.setdefault(f"{i}.{j}.linear.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    shared = bool(cfg.get("original_lm_head", False))
    if shared:
        if 0 not in lm_heads:
            raise HeadsLoadError(f"{source}: original_lm_head is set but lm_heads.0.weight is missing")
        if not block_heads:  # zero-layer shared heads: nothing in the weights says how many there are
            num_heads = int(cfg.get("num_heads", 1))
        # vLLM uses lm_heads.0 as the base model's own lm_head for every head: our shared_lm_head type.
        vocab_size, hidden_size = lm_heads[0].shape
        tensors_out = converted
    else:
        missing = [i for i in range(num_heads) if i not in lm_heads]
        if missing:
            raise HeadsLoadError(
                f"{source}: lm_heads.{missing[0]}.weight is missing (set original_lm_head for shared heads)"
            )
        vocab_size, hidden_size = lm_heads[0].shape
        tensors_out = dict(converted, **{f"{i}.{num_layers}.weight": w for i, w in lm_heads.items()})
    warn_config_mismatch(source, cfg, ("num_heads",), num_heads, "heads")
    warn_config_mismatch(source, cfg, ("num_hidden_layers",), num_layers, "layers")
    head_type = "shared_lm_head" if shared else "per_head_lm_head"
    layout = (hidden_size, vocab_size, num_heads, num_layers, head_type)
    return MedusaHeads.from_layout(tensors_out, *layout, cfg.get("base_model_name_or_path"), source)


def load_legacy_pt(path: str | Path) -> dict[str, torch.Tensor]:
    """A legacy `medusa_lm_head.pt` state dict, read with `torch.load(weights_only=True)` (no arbitrary unpickling)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but plain tensors/containers
        raise HeadsLoadError(
            f"{path}: refusing to load: it is not a plain tensor state dict loadable with weights_only=True ({e}). "
            f"Convert it to {WEIGHTS_NAME} in a trusted environment"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadsLoadError(f"{path}: expected a dict of tensors (a Medusa head state dict)")
    return state


def _is_vllm(cfg: dict, tensors: dict[str, torch.Tensor]) -> bool:
    return cfg.get("model_type") == "medusa" or any(k.startswith(("blocks.", "medusa_heads.blocks.")) for k in tensors)


def load_any_heads(path: str | Path, **hub_kwargs) -> MedusaHeads:
    """Heads from a folder, a weights file, or a Hub id, in our, upstream Medusa, legacy .pt, or vLLM layout."""
    local = Path(path).expanduser()
    weights_file: Path | None = local if local.is_file() else None
    folder = local.parent if weights_file else resolve_heads_folder(str(path), **hub_kwargs)
    cfg = read_heads_config(folder)
    if weights_file is None:
        candidates = [folder / WEIGHTS_NAME, *sorted(folder.glob("*.safetensors")), folder / LEGACY_WEIGHTS_NAME]
        weights_file = next((p for p in candidates if p.is_file()), None)
    if weights_file is None:
        raise HeadsLoadError(
            f"{folder} holds no Medusa weights ({WEIGHTS_NAME}, a vLLM model.safetensors, or {LEGACY_WEIGHTS_NAME}); "
            "point --heads at a heads folder, a medusa-export package, or a Hub id"
        )
    if weights_file.suffix == ".safetensors":
        tensors = load_file(str(weights_file))
    elif weights_file.suffix in (".pt", ".bin", ".pth"):
        tensors = load_legacy_pt(weights_file)
    else:
        raise HeadsLoadError(f"{weights_file}: unknown weights format; use .safetensors (or a legacy .pt)")
    source = str(weights_file)
    if _is_vllm(cfg, tensors):
        return heads_from_vllm_tensors(tensors, cfg, source)
    return MedusaHeads.from_tensors(tensors, cfg, source)
