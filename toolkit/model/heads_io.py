"""Medusa heads on disk: every layout we read and write, in one place.

- the medusa layout (upstream Medusa's, which we also write, and what TGI and TensorRT-LLM read):
  `medusa_lm_head.safetensors` with `{i}.{j}.linear.weight|bias` (residual block j of head i) and `{i}.{L}.weight`
  (head i's vocab projection).
- upstream's legacy `medusa_lm_head.pt`: read only through `torch.load(weights_only=True)`, never plain unpickling.
- vLLM's Medusa draft model: `model.safetensors` with `blocks.{i}.layers.{j}.weight|bias` and `lm_heads.{i}.weight`
  (vllm/model_executor/models/medusa.py); with `original_lm_head: true` a single `lm_heads.0` is the base lm_head.
- a truncated head vocabulary adds a `token_map` tensor (the K token ids the heads score) in every layout: vLLM reads
  it with `truncated_vocab_size: K` and K-row `lm_heads`; the medusa layout keeps full-vocabulary projections for
  TGI and TensorRT-LLM (which know no token map) and we cut them back to the map's rows when reading.

The weights are the truth: when a config.json disagrees with them about the number of heads or layers (upstream Hub
configs often do), we warn and use what the weights hold. Everything that cannot be read (a missing file, a truncated
safetensors file, keys that do not form heads) is a HeadsLoadError that says what to do.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medusa_toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from medusa_toolkit.model.heads import MedusaHeads

WEIGHTS_NAME = "medusa_lm_head.safetensors"
LEGACY_WEIGHTS_NAME = "medusa_lm_head.pt"
VLLM_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKEN_MAP = "token_map"
# Prefixes other trainers put in front of upstream's `{i}.{j}...` keys (vLLM strips `medusa_heads.` too).
KEY_PREFIXES = ("medusa_heads.", "medusa_head.", "heads.")
_VLLM_KEY = re.compile(r"^(?:blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)|lm_heads\.(\d+)\.weight)$")


class HeadsLoadError(ToolkitError, ValueError):
    """Heads could not be loaded or do not fit the base model; the message says why and what to do."""


@dataclass(frozen=True)
class HeadsLayout:
    """The shape of a set of heads, as MedusaHeads' constructor takes it."""

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int
    head_type: str
    base_model_name_or_path: str | None = None
    token_map: torch.Tensor | None = None  # truncated heads: the token ids they score


# ----------------------------------------------------------------------------------------------------------------------
# Finding and reading files


def resolve_heads_folder(path: str, **hub_kwargs) -> Path:
    """A local folder as is; otherwise a Hub repo id downloaded (and cached) with huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise HeadsLoadError(
            f"heads folder not found: {path}. Pass a folder holding {WEIGHTS_NAME} or a Hub id ORG/NAME"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.pt", "*.md", "*.png"], **hub_kwargs)
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise HeadsLoadError(
            f"could not fetch heads {path!r} from the Hub ({e}); check the id, your token, or pass a local folder"
        ) from None


INT_KEYS = ("hidden_size", "vocab_size", "medusa_num_heads", "medusa_num_layers", "num_heads", "truncated_vocab_size")


def read_heads_config(folder: Path) -> dict:
    """A heads folder's config.json as a dict ({} when absent); a clear error when it is not JSON."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        return {}
    for key in INT_KEYS:  # a number written as a string would pass every shape check with the wrong message later
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise HeadsLoadError(f"{path}: {key} must be an integer, got {value!r} ({type(value).__name__}); fix "
                                 "config.json")  # fmt: skip
    return cfg


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a legacy .pt state dict (weights_only); corrupt files are a HeadsLoadError."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError (truncated, bad header), OSError
            raise HeadsLoadError(
                f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; write it again "
                "(save_pretrained / medusa-export) or download it again"
            ) from None
    if path.suffix in (".pt", ".bin", ".pth"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything but plain tensors/containers
            raise HeadsLoadError(
                f"{path}: refusing to load: it is not a plain tensor state dict loadable with weights_only=True "
                f"({e}). Convert it to {WEIGHTS_NAME} in a trusted environment"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HeadsLoadError(f"{path}: expected a dict of tensors (a Medusa head state dict)")
        return state
    raise HeadsLoadError(f"{path}: unknown weights format; use .safetensors (or a legacy .pt)")


def read(path: str | Path, **hub_kwargs) -> tuple[dict[str, torch.Tensor], HeadsLayout, str]:
    """(medusa-layout tensors, layout, source) of heads in a folder, a weights file or a Hub id, in any layout."""
    local = Path(path).expanduser()
    weights_file: Path | None = local if local.is_file() else None
    folder = local.parent if weights_file else resolve_heads_folder(str(path), **hub_kwargs)
    cfg = read_heads_config(folder)
    if weights_file is None:
        candidates = [folder / WEIGHTS_NAME, *sorted(folder.glob("*.safetensors")), folder / LEGACY_WEIGHTS_NAME]
        weights_file = next((p for p in candidates if p.is_file()), None)
    if weights_file is None:
        raise HeadsLoadError(
            f"{folder} holds no {WEIGHTS_NAME} (nor a vLLM {VLLM_WEIGHTS_NAME} or a legacy {LEGACY_WEIGHTS_NAME}); "
            "point --heads at a heads folder, a medusa-export package, or a Hub id"
        )
    tensors, source = load_weights(weights_file), str(weights_file)
    is_vllm = cfg.get("model_type") == "medusa" or any(
        k.startswith(("blocks.", "medusa_heads.blocks.")) for k in tensors
    )
    if is_vllm:
        return (*from_vllm_tensors(tensors, cfg, source), source)
    return (*from_medusa_tensors(tensors, cfg, source), source)


# ----------------------------------------------------------------------------------------------------------------------
# Layouts -> (medusa-layout tensors, HeadsLayout)


def strip_key_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        for prefix in KEY_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def warn_config_mismatch(source: str, cfg: dict, keys: tuple[str, ...], found: int, what: str) -> None:
    """Warn when a config.json count disagrees with what the weights hold (the weights win)."""
    for key in keys:
        if key in cfg and cfg[key] != found:
            warnings.warn(
                f"{source}: config.json says {key}={cfg[key]} but the weights hold {found} {what}; using {found}",
                stacklevel=3,
            )


def infer_layout(tensors: dict[str, torch.Tensor]) -> tuple[int, int, bool]:
    """(num_heads, num_layers, has_projection) from upstream-style keys `{i}.{j}.linear.weight` / `{i}.{L}.weight`."""
    heads, layers, proj = set(), set(), False
    for key in tensors:
        parts = key.split(".")
        if not parts[0].isdigit():
            raise HeadsLoadError(
                f"unexpected key {key!r} in Medusa weights (expected '{{head}}.{{layer}}.linear.weight')"
            )
        heads.add(int(parts[0]))
        if len(parts) == 4 and parts[2] == "linear":
            layers.add(int(parts[1]))
        elif len(parts) == 3 and parts[2] == "weight":
            proj = True
    if not heads:
        raise HeadsLoadError("the Medusa weights file is empty")
    return max(heads) + 1, (max(layers) + 1 if layers else 0), proj


def from_medusa_tensors(
    tensors: dict[str, torch.Tensor], cfg: dict | None, source: str
) -> tuple[dict[str, torch.Tensor], HeadsLayout]:
    """Medusa-layout tensors (any key prefix) and an optional config -> (clean tensors, layout)."""
    cfg = cfg or {}
    tensors = strip_key_prefixes(tensors)
    token_map = tensors.pop(TOKEN_MAP, None)
    num_heads, num_layers, has_proj = infer_layout(tensors)
    warn_config_mismatch(source, cfg, ("medusa_num_heads", "num_heads"), num_heads, "heads")
    warn_config_mismatch(source, cfg, ("medusa_num_layers", "num_hidden_layers"), num_layers, "layers")
    hidden_size = tensors["0.0.linear.weight"].shape[0] if num_layers else cfg.get("hidden_size")
    vocab_size = cfg.get("vocab_size")
    if has_proj:
        rows, hidden_size = tensors[f"0.{num_layers}.weight"].shape
        if token_map is None:
            vocab_size = rows
        elif vocab_size is None:
            raise HeadsLoadError(f"{source}: truncated heads (token_map) need vocab_size in config.json")
        elif rows == vocab_size:  # full-vocabulary projections (the TGI layout): the heads score the map's rows
            tensors = {k: v[token_map] if k.endswith(f".{num_layers}.weight") else v for k, v in tensors.items()}
        elif rows != len(token_map):
            raise HeadsLoadError(
                f"{source}: projections have {rows} rows, neither the vocabulary ({vocab_size}) nor the token_map "
                f"({len(token_map)})"
            )
    if hidden_size is None or vocab_size is None:
        raise HeadsLoadError(
            f"{source}: cannot tell hidden_size/vocab_size from the weights; config.json must give them"
        )
    head_type = "per_head_lm_head" if has_proj else "shared_lm_head"
    if has_proj and cfg.get("head_type") == "shared_lm_head" and cfg.get("lm_head_copied_from_base"):
        # medusa-export of shared heads: every projection is the same copy of the base lm_head. Drop the copies
        # and use the base's own lm_head again (num_heads fewer vocab-sized matrices, bit-identical logits).
        first = tensors[f"0.{num_layers}.weight"]
        if all(torch.equal(tensors[f"{i}.{num_layers}.weight"], first) for i in range(1, num_heads)):
            head_type = "shared_lm_head"
            copies = {f"{i}.{num_layers}.weight" for i in range(num_heads)}
            tensors = {k: v for k, v in tensors.items() if k not in copies}
    base = cfg.get("base_model_name_or_path")
    return tensors, HeadsLayout(hidden_size, vocab_size, num_heads, num_layers, head_type, base, token_map)


def from_vllm_tensors(
    tensors: dict[str, torch.Tensor], cfg: dict, source: str
) -> tuple[dict[str, torch.Tensor], HeadsLayout]:
    """vLLM-layout tensors (`blocks.{i}.layers.{j}.*`, `lm_heads.{i}.weight`) -> (medusa-layout tensors, layout)."""
    tensors = {k.removeprefix("medusa_heads."): v for k, v in tensors.items()}
    token_map = tensors.pop(TOKEN_MAP, None)
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
    truncated = cfg.get("truncated_vocab_size") not in (None, cfg.get("vocab_size"))
    if truncated and (token_map is None or len(token_map) != cfg["truncated_vocab_size"]):
        raise HeadsLoadError(
            f"{source}: config.json says truncated_vocab_size={cfg['truncated_vocab_size']} but the weights hold "
            f"{'no token_map' if token_map is None else f'a token_map of {len(token_map)} ids'}"
        )
    if not truncated:
        token_map = None  # vLLM ignores a map when nothing is truncated; so do we
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
        hidden_size = lm_heads[0].shape[1]
        out = converted
    else:
        missing = [i for i in range(num_heads) if i not in lm_heads]
        if missing:
            raise HeadsLoadError(
                f"{source}: lm_heads.{missing[0]}.weight is missing (set original_lm_head for shared heads)"
            )
        hidden_size = lm_heads[0].shape[1]
        out = dict(converted, **{f"{i}.{num_layers}.weight": w for i, w in lm_heads.items()})
    vocab_size = cfg["vocab_size"] if truncated else lm_heads[0].shape[0]
    warn_config_mismatch(source, cfg, ("num_heads",), num_heads, "heads")
    warn_config_mismatch(source, cfg, ("num_hidden_layers",), num_layers, "layers")
    head_type = "shared_lm_head" if shared else "per_head_lm_head"
    base = cfg.get("base_model_name_or_path")
    return out, HeadsLayout(hidden_size, vocab_size, num_heads, num_layers, head_type, base, token_map)


# ----------------------------------------------------------------------------------------------------------------------
# Heads -> layouts (what the packages of medusa-export hold)


def _lm_head_for(heads: MedusaHeads, lm_head_weight: torch.Tensor | None) -> torch.Tensor | None:
    """The base lm_head weight shared or truncated heads need (checked against the heads' sizes); None for untruncated
    per-head heads."""
    if heads.head_type != "shared_lm_head" and heads.token_map is None:
        return None
    if lm_head_weight is None:
        raise ValueError(
            "these heads share the base model's lm_head or truncate its vocabulary: exporting them needs the base "
            "lm_head weight "
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
    """Medusa-layout keys with a full-vocabulary projection for every head (TGI and TensorRT-LLM need one): shared heads get
    copies of the base lm_head; truncated per-head heads get theirs at the token_map's rows and the base lm_head's
    elsewhere, plus the `token_map` (which we read back; the engines ignore it and score the whole vocabulary)."""
    base = _lm_head_for(heads, lm_head_weight)
    out = {k.removeprefix("heads."): _cast(v, dtype) for k, v in heads.state_dict().items()}
    for i in range(heads.num_heads):
        key = f"{i}.{heads.num_layers}.weight"
        if heads.head_type == "shared_lm_head":
            out[key] = _cast(base, dtype)
        elif heads.token_map is not None:
            trained = heads.heads[i][-1].weight.detach().to(base.dtype)
            out[key] = _cast(base.index_copy(0, heads.token_map.to(base.device), trained), dtype)
    if heads.token_map is not None:
        out[TOKEN_MAP] = heads.token_map.clone()
    return out


def vllm_tensors(
    heads: MedusaHeads, lm_head_weight: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """vLLM keys: `blocks.{i}.layers.{j}.weight|bias`, `lm_heads.{i}.weight` (only `lm_heads.0` for shared heads), and
    for truncated heads K-row `lm_heads` with the `token_map` vLLM spreads their logits with."""
    shared = heads.head_type == "shared_lm_head"
    base = _lm_head_for(heads, lm_head_weight)
    out = {}
    for i, head in enumerate(heads.heads):
        for j in range(heads.num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = _cast(head[j].linear.weight, dtype)
            out[f"blocks.{i}.layers.{j}.bias"] = _cast(head[j].linear.bias, dtype)
        if not shared:
            out[f"lm_heads.{i}.weight"] = _cast(head[heads.num_layers].weight, dtype)
    if shared:
        # vLLM maps lm_heads.0.weight onto its single lm_head when original_lm_head is set.
        out["lm_heads.0.weight"] = _cast(heads.rows(base), dtype)
    if heads.token_map is not None:
        out[TOKEN_MAP] = heads.token_map.clone()
    return out
