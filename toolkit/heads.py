"""Medusa heads: small residual MLPs on the base model's last hidden state, each guessing one token further ahead.

Head k (0-based) reads the hidden state at position t and predicts the token at t + k + 2; the base model's own
lm_head already predicts t + 1. A head is `num_layers` residual blocks `x + SiLU(W x + b)` followed by a vocabulary
projection. W starts at zero so a new head starts as the identity, i.e. as a copy of the base lm_head's guess.
Every layer has its own weights (upstream Medusa builds the blocks with `[ResBlock] * n`, which shares them).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.version import __version__

HeadType = Literal["per_head_lm_head", "shared_lm_head"]
WEIGHTS_NAME = "medusa_lm_head.safetensors"
CONFIG_NAME = "config.json"


class HeadsLoadError(ToolkitError, ValueError):
    """Heads could not be loaded or do not fit the base model; the message says why and what to do."""


class ResBlock(nn.Module):
    """`x + SiLU(W x + b)` with W zero-initialised (identity at init)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        # Same bias init as upstream (nn.Linear's default uniform): breaks the symmetry between heads.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


@dataclass
class MedusaHeadsConfig:
    hidden_size: int
    vocab_size: int
    medusa_num_heads: int
    medusa_num_layers: int = 1
    head_type: HeadType = "per_head_lm_head"
    base_model_name_or_path: str | None = None
    medusa_toolkit_version: str = __version__


class MedusaHeads(nn.Module):
    """`num_heads` Medusa heads. `forward(hidden, lm_head)` returns logits [num_heads, *hidden.shape[:-1], vocab]."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int = 1,
        head_type: HeadType = "per_head_lm_head",
        base_model_name_or_path: str | None = None,
    ):
        super().__init__()
        if head_type not in ("per_head_lm_head", "shared_lm_head"):
            raise ValueError(f"head_type {head_type!r} is unknown; use 'per_head_lm_head' or 'shared_lm_head'")
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 0, got {num_heads} and {num_layers}")
        self.config = MedusaHeadsConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            medusa_num_heads=num_heads,
            medusa_num_layers=num_layers,
            head_type=head_type,
            base_model_name_or_path=base_model_name_or_path,
        )
        # nn.Sequential indices give upstream's key layout: {i}.{j}.linear.weight and {i}.{num_layers}.weight.
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            layers: list[nn.Module] = [ResBlock(hidden_size) for _ in range(num_layers)]
            if head_type == "per_head_lm_head":
                layers.append(nn.Linear(hidden_size, vocab_size, bias=False))
            self.heads.append(nn.Sequential(*layers))

    @property
    def num_heads(self) -> int:
        return self.config.medusa_num_heads

    @property
    def num_layers(self) -> int:
        return self.config.medusa_num_layers

    @property
    def head_type(self) -> HeadType:
        return self.config.head_type

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Copy the base lm_head into every head's own projection (per_head_lm_head), as upstream does."""
        if self.head_type != "per_head_lm_head":
            return
        with torch.no_grad():
            for head in self.heads:
                head[-1].weight.copy_(lm_head_weight)

    def hidden(self, hidden_states: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Each head's residual-block output before the vocab projection: [num_heads, ..., hidden]."""
        outs = []
        for head in self.heads[:num_heads]:
            x = hidden_states
            for block in head[: self.num_layers]:
                x = block(x)
            outs.append(x)
        return torch.stack(outs)

    def forward(
        self, hidden_states: torch.Tensor, lm_head: nn.Module | None = None, num_heads: int | None = None
    ) -> torch.Tensor:
        """Logits of the first `num_heads` heads (all by default): [num_heads, ..., vocab].

        `lm_head` (the base's) is needed for shared heads.
        """
        if num_heads == 0:
            return hidden_states.new_zeros((0, *hidden_states.shape[:-1], self.config.vocab_size))
        if self.head_type == "shared_lm_head":
            if lm_head is None:
                raise ValueError("shared_lm_head heads need the base model's lm_head: call heads(hidden, lm_head)")
            return lm_head(self.hidden(hidden_states, num_heads))
        return torch.stack([head(hidden_states) for head in self.heads[:num_heads]])

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face style save / load

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write `config.json` and `medusa_lm_head.safetensors` (upstream-compatible keys) into a folder."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k.removeprefix("heads."): v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "producer": "medusa-toolkit"})
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, **hub_kwargs) -> MedusaHeads:
        """Load heads from a folder (or a Hub id) holding `config.json` + `medusa_lm_head.safetensors`."""
        folder = resolve_heads_folder(str(path), **hub_kwargs)
        weights_file = folder / WEIGHTS_NAME
        if not weights_file.is_file():
            raise HeadsLoadError(
                f"{folder} holds no {WEIGHTS_NAME}; point --heads at a folder written by save_pretrained or medusa-export"
            )
        return cls.from_tensors(load_file(str(weights_file)), read_heads_config(folder), str(weights_file))

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], config: dict | None = None, source: str = "weights"
    ) -> MedusaHeads:
        """Heads from upstream-layout tensors (`{i}.{j}.linear.weight`, `{i}.{L}.weight`) and an optional config.

        The weights are the truth: when the config disagrees about the number of heads or layers (upstream Hub
        configs often do), warn and use what the weights hold.
        """
        cfg = config or {}
        tensors = strip_key_prefixes(tensors)
        num_heads, num_layers, has_proj = infer_layout(tensors)
        warn_config_mismatch(source, cfg, ("medusa_num_heads", "num_heads"), num_heads, "heads")
        warn_config_mismatch(source, cfg, ("medusa_num_layers", "num_hidden_layers"), num_layers, "layers")
        hidden_size = tensors["0.0.linear.weight"].shape[0] if num_layers else cfg.get("hidden_size")
        vocab_size = cfg.get("vocab_size")
        if has_proj:
            vocab_size, hidden_size = tensors[f"0.{num_layers}.weight"].shape
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
        layout = (hidden_size, vocab_size, num_heads, num_layers, head_type)
        return cls.from_layout(tensors, *layout, cfg.get("base_model_name_or_path"), source)

    @classmethod
    def from_layout(
        cls,
        tensors: dict[str, torch.Tensor],
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int,
        head_type: HeadType,
        base_model_name_or_path: str | None,
        source: str,
    ) -> MedusaHeads:
        """Heads of a known shape holding exactly `tensors` (upstream keys); a clear error when they do not fit."""
        heads = cls(hidden_size, vocab_size, num_heads, num_layers, head_type, base_model_name_or_path)
        try:
            heads.heads.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise HeadsLoadError(f"{source}: the weights do not form complete Medusa heads ({e})") from None
        return heads

    def check_compatible(self, base: nn.Module) -> None:
        """Raise a clear error when these heads were made for a base of another hidden or vocab size."""
        lm_head = base.get_output_embeddings()
        vocab, hidden = lm_head.weight.shape
        if (hidden, vocab) != (self.config.hidden_size, self.config.vocab_size):
            raise HeadsLoadError(
                f"heads do not fit this base model: heads have hidden_size={self.config.hidden_size}, "
                f"vocab_size={self.config.vocab_size}; the base has hidden_size={hidden}, vocab_size={vocab}. "
                f"Use heads trained for this base (heads say base_model_name_or_path="
                f"{self.config.base_model_name_or_path!r})."
            )


# Prefixes other trainers put in front of upstream's `{i}.{j}...` keys (vLLM strips `medusa_heads.` too).
KEY_PREFIXES = ("medusa_heads.", "medusa_head.", "heads.")


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


def read_heads_config(folder: Path) -> dict:
    """A heads folder's config.json as a dict ({} when absent); a clear error when it is not JSON."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HeadsLoadError(f"{path} is not valid JSON: {e}") from None
    return cfg if isinstance(cfg, dict) else {}


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
