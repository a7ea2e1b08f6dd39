"""On-disk layouts of Medusa heads: upstream Medusa (also read by TGI and TensorRT-LLM) and vLLM's Medusa draft model.

Both layouts hold the same function: head i is `num_layers` residual blocks `x + SiLU(W x + b)` then a vocab projection.
- medusa: `medusa_lm_head.safetensors` with `{i}.{j}.linear.weight|bias` and `{i}.{num_layers}.weight` (projection).
- vllm:   `model.safetensors` with `blocks.{i}.layers.{j}.weight|bias` and `lm_heads.{i}.weight`; config.json
          `model_type: medusa` (vllm/transformers_utils/configs/medusa.py, vllm/model_executor/models/medusa.py).
Shared-projection heads have no projection of their own: the medusa layout gets a copy of the base lm_head per head
(TGI and TensorRT-LLM need one); the vllm layout sets `original_lm_head: true` and stores it once as `lm_heads.0`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_toolkit.heads import WEIGHTS_NAME, MedusaHeads
from medusa_toolkit.version import __version__

VLLM_WEIGHTS_NAME = "model.safetensors"


def _lm_head_for(heads: MedusaHeads, lm_head_weight: torch.Tensor | None) -> torch.Tensor | None:
    """The base lm_head weight shared heads need (checked against the heads' sizes); None for per-head heads."""
    if heads.head_type != "shared_lm_head":
        return None
    if lm_head_weight is None:
        raise ValueError(
            "these heads share the base model's lm_head: exporting them needs the base lm_head weight "
            "(pass --base-model, or lm_head_weight=base.get_output_embeddings().weight)"
        )
    expected = (heads.config.vocab_size, heads.config.hidden_size)
    if tuple(lm_head_weight.shape) != expected:
        raise ValueError(
            f"base lm_head has shape {tuple(lm_head_weight.shape)} but the heads need {expected} (vocab, hidden)"
        )
    return lm_head_weight.detach()


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # clone(): safetensors refuses tensors that share storage (the shared lm_head copies).
    return t.detach().to(device="cpu", dtype=dtype or t.dtype).clone().contiguous()


def medusa_tensors(
    heads: MedusaHeads, lm_head_weight: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Upstream Medusa keys: `{i}.{j}.linear.weight|bias`, `{i}.{num_layers}.weight` (every head has a projection)."""
    shared = _lm_head_for(heads, lm_head_weight)
    out = {k.removeprefix("heads."): _cast(v, dtype) for k, v in heads.state_dict().items()}
    if shared is not None:
        for i in range(heads.num_heads):
            out[f"{i}.{heads.num_layers}.weight"] = _cast(shared, dtype)
    return out


def vllm_tensors(
    heads: MedusaHeads, lm_head_weight: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """vLLM keys: `blocks.{i}.layers.{j}.weight|bias`, `lm_heads.{i}.weight` (only `lm_heads.0` for shared heads)."""
    shared = _lm_head_for(heads, lm_head_weight)
    out = {}
    for i, head in enumerate(heads.heads):
        for j in range(heads.num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = _cast(head[j].linear.weight, dtype)
            out[f"blocks.{i}.layers.{j}.bias"] = _cast(head[j].linear.bias, dtype)
        if shared is None:
            out[f"lm_heads.{i}.weight"] = _cast(head[heads.num_layers].weight, dtype)
    if shared is not None:
        # vLLM maps lm_heads.0.weight onto its single lm_head when original_lm_head is set.
        out["lm_heads.0.weight"] = _cast(shared, dtype)
    return out


def medusa_config(heads: MedusaHeads, base_model: str | None, tree: dict | None = None) -> dict:
    """config.json of the medusa layout: upstream's keys (with the TRUE head count) plus ours."""
    c = heads.config
    return {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": base_model or c.base_model_name_or_path,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "head_type": c.head_type,
        # True when the projection in the weights is a copy of the base lm_head (shared heads).
        "lm_head_copied_from_base": c.head_type == "shared_lm_head",
        "medusa_toolkit_version": __version__,
        "medusa_choices": [list(p) for p in tree["paths"]] if tree else None,
    }


def vllm_config(heads: MedusaHeads, base_model: str | None) -> dict:
    """config.json for vLLM's MedusaConfig. Its loader renames every key holding 'num' and 'heads' to num_heads
    (and 'num' + 'layers' to num_hidden_layers), so no other key may contain those words."""
    c = heads.config
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": heads.num_heads,
        "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": None,
        # vLLM builds the residual layers without bias unless this is set, silently dropping ours.
        "medusa_fc_bias": True,
        "original_lm_head": c.head_type == "shared_lm_head",
        "base_model_name_or_path": base_model or c.base_model_name_or_path,
        "head_type": c.head_type,
        "medusa_toolkit_version": __version__,
    }
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_medusa(
    heads: MedusaHeads,
    out_dir: str | Path,
    lm_head_weight: torch.Tensor | None = None,
    base_model: str | None = None,
    tree: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `medusa_lm_head.safetensors` + `config.json` (upstream Medusa / TGI / TensorRT-LLM layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(medusa_tensors(heads, lm_head_weight, dtype), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(out / "config.json", medusa_config(heads, base_model, tree))
    return out


def write_vllm(
    heads: MedusaHeads,
    out_dir: str | Path,
    lm_head_weight: torch.Tensor | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model.safetensors` + `config.json` in the layout vLLM's Medusa draft model loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(vllm_tensors(heads, lm_head_weight, dtype), str(out / VLLM_WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(out / "config.json", vllm_config(heads, base_model))
    return out
