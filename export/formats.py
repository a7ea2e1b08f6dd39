"""The two package layouts medusa-export writes: weights (tensor layouts from medusa_toolkit.model.heads_io) + config.json.

Both hold the same function: head i is `num_layers` residual blocks `x + SiLU(W x + b)` then a vocab projection.
- medusa: `medusa_lm_head.safetensors` with `{i}.{j}.linear.weight|bias` and `{i}.{num_layers}.weight` (projection),
          read by TGI (`--speculate`) and TensorRT-LLM's examples/medusa/convert_checkpoint.py. Upstream Medusa's own
          loader is NOT a target: it reads only `medusa_lm_head.pt`, builds 5 heads whatever the config says, loads
          with strict=False and shares one residual block across layers (`[ResBlock] * n`).
- vllm:   `model.safetensors` with `blocks.{i}.layers.{j}.weight|bias` and `lm_heads.{i}.weight`; config.json
          `model_type: medusa` (vllm/transformers_utils/configs/medusa.py, vllm/model_executor/models/medusa.py).
Shared-projection heads have no projection of their own: the medusa layout gets a copy of the base lm_head per head
(TGI and TensorRT-LLM need one); the vllm layout sets `original_lm_head: true` and stores it once as `lm_heads.0`.
Truncated heads (a `token_map`): vllm gets K-row projections and `truncated_vocab_size: K`, which its Medusa model
supports; medusa gets full-vocabulary projections, so TGI and TensorRT-LLM score every token (still lossless).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.heads_io import VLLM_WEIGHTS_NAME, WEIGHTS_NAME, medusa_tensors, vllm_tensors
from medusa_toolkit.version import __version__


def medusa_config(heads: MedusaHeads, base_model: str | None, tree: dict | None = None) -> dict:
    """config.json of the medusa layout: upstream Medusa's keys (with the TRUE head count, as TGI reads them) plus ours."""
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
        # Truncated heads: the projections above are full-vocabulary for TGI / TensorRT-LLM; `token_map` in the
        # weights names the rows the heads were trained to score (we read them back truncated).
        "truncated_vocab_size": c.truncated_vocab_size,
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
        # K-row lm_heads and a token_map tensor when the heads score K tokens only (vLLM spreads them with it).
        "truncated_vocab_size": c.truncated_vocab_size,
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
    """Write `medusa_lm_head.safetensors` + `config.json` (the layout TGI and TensorRT-LLM's converter read)."""
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
