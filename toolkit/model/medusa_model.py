"""MedusaModel: a frozen base causal LM plus Medusa heads, one forward for both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medusa_toolkit.model.base_model import freeze, load_base_model
from medusa_toolkit.model.heads import MedusaHeads


def logit_transform(config: Any) -> tuple[float, float | None]:
    """What a base family does to `lm_head(hidden)` to get its logits: (multiplier, final soft-cap or None).

    Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2 soft-caps with
    `final_logit_softcapping` (tanh(x / cap) * cap). Others: (1.0, None).
    """
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    return scale, getattr(config, "final_logit_softcapping", None) or None


@dataclass
class BaseHead:
    """The base model's map from last hidden states to next-token logits: lm_head weight (and bias), the family's
    logit scale and soft-cap. The one definition of "base logits from hidden" used by inference (MedusaModel) and by
    the training objective (train.losses), so shared heads and kl targets see exactly the base's distribution."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, base: nn.Module, weight: torch.Tensor | None = None, frozen_copy: bool = False) -> BaseHead:
        """The head of a loaded base. `weight` overrides the lm_head weight (e.g. a gathered copy of a ZeRO-3
        partitioned one); `frozen_copy` detaches and clones the tensors (training keeps them outside the engine)."""
        lm_head = base.get_output_embeddings()
        weight = lm_head.weight if weight is None else weight
        bias = getattr(lm_head, "bias", None)
        if frozen_copy:
            weight = weight.detach().clone()
            bias = None if bias is None else bias.detach().clone()
        return cls(weight, bias, *logit_transform(base.config))

    def rows(self, index: torch.Tensor | None) -> BaseHead:
        """The same map over the vocabulary rows `index` only (truncated heads' token_map); None: all rows."""
        if index is None:
            return self
        index = index.to(self.weight.device)
        bias = None if self.bias is None else self.bias[index]
        return BaseHead(self.weight[index], bias, self.scale, self.softcap)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(hidden_states.dtype)
        logits = F.linear(hidden_states, self.weight.to(hidden_states.dtype), bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class MedusaOutput:
    """logits: base [B, T, V]; medusa_logits: heads [num_heads, B, T, V]; hidden_states: [B, T, H]; cache."""

    logits: torch.Tensor
    medusa_logits: torch.Tensor | None
    hidden_states: torch.Tensor
    cache: Any


class MedusaModel(nn.Module):
    """A frozen base model with Medusa heads on its last hidden state.

    `heads=None` is the base alone: it decodes the 1-node tree only (`decoding.greedy_generate_batch`: plain greedy
    decoding through the same loop, e.g. the data stage writing the heads' training text before any heads exist).
    """

    def __init__(self, base: nn.Module, heads: MedusaHeads | None, tokenizer: Any = None):
        super().__init__()
        self.base = freeze(base)
        self.tokenizer = tokenizer
        # How decoding runs the step and the heads: these eager methods, or their compiled versions once
        # `decoding.compiled.compile_decoding` has set them up (once per model, not per call or step).
        self.step_fn, self.heads_fn, self.compiled = self.step, self.medusa_logits, False
        self.heads, self.heads_sha256, self._heads_lm_head = None, None, None
        if heads is None:
            return
        heads.check_compatible(base)
        # Hashed before the cast below: a verify report names the heads as they are on disk, not in the verify dtype.
        self.heads_sha256 = heads.content_digest()
        param = next(base.parameters())
        self.heads = heads.to(device=param.device, dtype=param.dtype).eval()
        # Truncated shared heads score the token_map's rows of the base's lm_head: sliced once, not every step.
        self._heads_lm_head = BaseHead.of(self.base).rows(heads.token_map) if heads.token_map is not None else None

    @classmethod
    def from_pretrained(
        cls,
        base: str | nn.Module,
        heads: str | Path | MedusaHeads,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        tokenizer: Any = None,
    ) -> MedusaModel:
        """Load a base (Hub id, folder, .gguf, alias, or a loaded model) and heads (folder, Hub id, or MedusaHeads)."""
        if isinstance(base, str):
            base, tokenizer = load_base_model(base, dtype=dtype, device=device, attn_implementation=attn_implementation)
        if not isinstance(heads, MedusaHeads):
            heads = MedusaHeads.from_pretrained(heads)
        return cls(base, heads, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def num_heads(self) -> int:
        return 0 if self.heads is None else self.heads.num_heads

    def base_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The base model's logits from its last hidden states (lm_head with bias, logit scale and final soft-cap for
        the families that use them: Cohere, Granite, Gemma 2, Phi): `BaseHead`, as training computes them."""
        return BaseHead.of(self.base)(hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
        with_medusa: bool = True,
        **attn_kwargs: Any,
    ) -> MedusaOutput:
        """Run the base decoder once; return base and head logits for the last `logits_to_keep` positions (0: all).

        `with_medusa=False` skips the heads (medusa_logits is None): a tree step needs them at one node only, and
        num_heads x nodes x vocab projections would cost more than the base forward on a small model.
        """
        out = self.base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **attn_kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        medusa_logits = self.medusa_logits(hidden) if with_medusa else None
        return MedusaOutput(self.base_logits(hidden), medusa_logits, hidden, cache)

    def step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any, **attn_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step's forward over its new tokens (no heads): base logits [B, T, V] and last hidden states
        [B, T, H]. What decoding calls through `step_fn`, the compiled step where decoding.compiled set one up."""
        out = self.base.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, **attn_kwargs
        )
        hidden = out.last_hidden_state
        return self.base_logits(hidden), hidden

    def medusa_logits(self, hidden_states: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """The first `num_heads` heads' logits [num_heads, ..., V] (all by default) on given last hidden states; a
        truncated head's are -inf outside its token_map."""
        if self.heads is None:
            if num_heads:
                raise ValueError(f"this MedusaModel has no heads, so it cannot give {num_heads} heads' logits")
            return hidden_states.new_zeros((0, *hidden_states.shape[:-1], self.base.config.vocab_size))
        # Shared heads project through the base's whole logit map (soft-cap, scale, bias), exactly as in training.
        lm_head = self.base_logits if self._heads_lm_head is None else self._heads_lm_head
        return self.heads.full_vocab_logits(self.heads(hidden_states, lm_head, num_heads))
