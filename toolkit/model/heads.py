"""Medusa heads: small residual MLPs on the base model's last hidden state, each guessing one token further ahead.

Head k (0-based) reads the hidden state at position t and predicts the token at t + k + 2; the base model's own
lm_head already predicts t + 1. A head is `num_layers` residual blocks `x + SiLU(W x + b)` followed by a vocabulary
projection. W starts at zero so a new head starts as the identity, i.e. as a copy of the base lm_head's guess.
Every layer has its own weights (upstream Medusa builds the blocks with `[ResBlock] * n`, which shares them).

A truncated vocabulary (`truncated_vocab_size` K, as vLLM's Medusa calls it): the heads guess only among K tokens,
`token_map` (the K the base emits most often in the training data), so each head's projection is K x hidden instead
of vocab x hidden. Exactness does not depend on it (the base verifies every guess); it only makes the heads cheaper:
on a small base on a CPU the three vocab projections cost a tenth of a decoding step and most of a training step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from medusa_toolkit.model import heads_io
from medusa_toolkit.model.heads_io import CONFIG_NAME, WEIGHTS_NAME, HeadsLayout, HeadsLoadError
from medusa_toolkit.version import __version__

HeadType = Literal["per_head_lm_head", "shared_lm_head"]
__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "HeadsLoadError", "MedusaHeads", "MedusaHeadsConfig", "ResBlock"]


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
    truncated_vocab_size: int | None = None  # None: the whole vocabulary
    medusa_toolkit_version: str = __version__


class MedusaHeads(nn.Module):
    """`num_heads` Medusa heads. `forward(hidden, lm_head)` returns logits [num_heads, *hidden.shape[:-1], vocab]
    (truncated heads: over their `token_map`'s tokens only; `full_vocab_logits` spreads them over the vocabulary)."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int = 1,
        head_type: HeadType = "per_head_lm_head",
        base_model_name_or_path: str | None = None,
        token_map: torch.Tensor | list[int] | None = None,
    ):
        super().__init__()
        if head_type not in ("per_head_lm_head", "shared_lm_head"):
            raise ValueError(f"head_type {head_type!r} is unknown; use 'per_head_lm_head' or 'shared_lm_head'")
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 0, got {num_heads} and {num_layers}")
        if token_map is not None:
            token_map = torch.as_tensor(token_map, dtype=torch.long).flatten()
            if len(token_map) >= vocab_size:
                token_map = None  # a map of the whole vocabulary truncates nothing
            elif (
                len(token_map) == 0
                or token_map.unique().numel() != len(token_map)
                or not (0 <= int(token_map.min()) and int(token_map.max()) < vocab_size)
            ):
                raise ValueError(f"token_map must hold distinct token ids in [0, {vocab_size}), at least one")
        self.config = MedusaHeadsConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            medusa_num_heads=num_heads,
            medusa_num_layers=num_layers,
            head_type=head_type,
            base_model_name_or_path=base_model_name_or_path,
            truncated_vocab_size=None if token_map is None else len(token_map),
        )
        # Not a buffer: .to(dtype) must never touch token ids, and heads.state_dict() keeps upstream's keys.
        self.token_map: torch.Tensor | None = token_map
        # nn.Sequential indices give upstream's key layout: {i}.{j}.linear.weight and {i}.{num_layers}.weight.
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            layers: list[nn.Module] = [ResBlock(hidden_size) for _ in range(num_layers)]
            if head_type == "per_head_lm_head":
                layers.append(nn.Linear(hidden_size, self.head_vocab_size, bias=False))
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

    @property
    def head_vocab_size(self) -> int:
        """How many tokens each head scores: the truncated vocabulary's size, or the whole vocabulary's."""
        return self.config.truncated_vocab_size or self.config.vocab_size

    def full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits over the whole vocabulary [..., vocab]: a truncated head's scores at its token_map, -inf at
        every token it cannot guess (top-k and sampling then never pick one). Untruncated logits pass unchanged."""
        if self.token_map is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.token_map.to(logits.device), logits)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a vocab x hidden matrix (the base lm_head) these heads score: all, or the token_map's."""
        return weight if self.token_map is None else weight[self.token_map.to(weight.device)]

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Copy the base lm_head (its token_map rows) into every head's own projection (per_head_lm_head), as
        upstream does."""
        if self.head_type != "per_head_lm_head":
            return
        with torch.no_grad():
            for head in self.heads:
                head[-1].weight.copy_(self.rows(lm_head_weight))

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
        self,
        hidden_states: torch.Tensor,
        lm_head: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_heads: int | None = None,
    ) -> torch.Tensor:
        """Logits of the first `num_heads` heads (all by default): [num_heads, ..., vocab].

        `lm_head` (the base's) is needed for shared heads: pass the base's whole hidden-to-logits map
        (`MedusaModel.base_logits` / `medusa_model.BaseHead`), not the bare Linear, for bases that soft-cap or scale
        their logits (Gemma 2, Cohere, Granite). Truncated shared heads need it over their token_map's rows only
        (`BaseHead.rows(heads.token_map)`).
        """
        if num_heads == 0:
            return hidden_states.new_zeros((0, *hidden_states.shape[:-1], self.head_vocab_size))
        if self.head_type == "shared_lm_head":
            if lm_head is None:
                raise ValueError("shared_lm_head heads need the base model's lm_head: call heads(hidden, lm_head)")
            return lm_head(self.hidden(hidden_states, num_heads))
        return torch.stack([head(hidden_states) for head in self.heads[:num_heads]])

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face style save / load / push (the layouts themselves: medusa_toolkit.model.heads_io)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write `config.json` and `medusa_lm_head.safetensors` (upstream-compatible keys) into a folder."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k.removeprefix("heads."): v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.token_map is not None:
            tensors[heads_io.TOKEN_MAP] = self.token_map.cpu()
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "producer": "medusa-toolkit"})
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, **hub_kwargs) -> MedusaHeads:
        """Heads from a folder, a weights file or a Hub id, in any layout we know: the medusa layout (upstream Medusa's)
        (`medusa_lm_head.safetensors`, or a legacy `.pt` read with weights_only), or vLLM's (`model.safetensors`)."""
        tensors, layout, source = heads_io.read(path, **hub_kwargs)
        return cls.from_layout(tensors, layout, source)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], config: dict | None = None, source: str = "weights"
    ) -> MedusaHeads:
        """Heads from medusa-layout tensors (`{i}.{j}.linear.weight`, `{i}.{L}.weight`) and an optional config."""
        return cls.from_layout(*heads_io.from_medusa_tensors(tensors, config, source), source)

    @classmethod
    def from_layout(cls, tensors: dict[str, torch.Tensor], layout: HeadsLayout, source: str) -> MedusaHeads:
        """Heads of a known shape holding exactly `tensors` (upstream keys); a clear error when they do not fit."""
        heads = cls(
            layout.hidden_size, layout.vocab_size, layout.num_heads, layout.num_layers, layout.head_type,
            layout.base_model_name_or_path, layout.token_map,
        )  # fmt: skip
        try:
            heads.heads.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise HeadsLoadError(f"{source}: the weights do not form complete Medusa heads ({e})") from None
        return heads

    def push_to_hub(
        self,
        repo_id: str,
        *,
        verification: str | Path | None = None,
        tree: str | Path | None = None,
        base_model_id: str | None = None,
        allow_unverified: bool = False,
        private: bool = False,
        commit_message: str | None = None,
        **push_kwargs: Any,
    ):
        """Publish these heads to `repo_id` as `medusa-export --format medusa --push-to-hub` does: the medusa package
        with its model card, behind the same gate (a passing `verification` report naming exactly these heads, and
        the `tree` it verified, unless `allow_unverified`, and then the card says "Not verified"). Returns the pushes.
        """
        from medusa_toolkit import entry_points

        push_heads = entry_points.load(entry_points.PUSH_HEADS)
        return push_heads(
            self, repo_id, verification=verification, tree=tree, base_model_id=base_model_id,
            allow_unverified=allow_unverified, private=private, commit_message=commit_message, **push_kwargs,
        )  # fmt: skip

    def nonfinite(self) -> list[str]:
        """Names of the tensors holding nan or inf (a diverged training run's heads): never exported or pushed."""
        return [name for name, t in self.heads.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]

    def content_digest(self) -> str:
        """sha256 of what these heads compute: their shape and every tensor's dtype, shape and bytes.

        A verify report records it, and the push gate and model card accept that report only for heads with the
        same hash. Independent of file layout (a package reloaded gives the same hash), not of dtype.
        """
        h = hashlib.sha256()
        c = self.config
        h.update(
            json.dumps([c.hidden_size, c.vocab_size, c.medusa_num_heads, c.medusa_num_layers, c.head_type]).encode()
        )
        if self.token_map is not None:
            h.update(b"token_map|" + self.token_map.cpu().numpy().astype("<i8").tobytes())
        for key, value in sorted(self.heads.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    content_hash = content_digest  # its name before the digest/hash naming was unified; existing callers keep working

    def check_compatible(self, base: nn.Module) -> None:
        """Raise a clear error when these heads were made for a base of another hidden or vocab size."""
        weight = base.get_output_embeddings().weight
        # A ZeRO-3 partitioned parameter has shape (0,) on every rank; its full shape is ds_shape.
        vocab, hidden = tuple(getattr(weight, "ds_shape", weight.shape))
        if (hidden, vocab) != (self.config.hidden_size, self.config.vocab_size):
            raise HeadsLoadError(
                f"heads do not fit this base model: heads have hidden_size={self.config.hidden_size!r}, "
                f"vocab_size={self.config.vocab_size!r}; the base has hidden_size={hidden!r}, vocab_size={vocab!r}. "
                f"Use heads trained for this base (heads say base_model_name_or_path="
                f"{self.config.base_model_name_or_path!r})."
            )
