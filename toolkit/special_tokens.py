"""The EOS and pad rules, in one place, so that decoding, verification, calibration and the data stage agree.

EOS: what `generate()` does. Ids given explicitly win (an int or a list; `[]` means never stop early); otherwise the
model's generation config decides. Pad: padding is always masked out, so any id gives the same tokens; one rule only
fixes WHICH id fills the right-padded outputs: the generation config's pad id, else the tokenizer's, else the first EOS
id, else 0.
"""

from __future__ import annotations

from typing import Any


def _generation_config(model: Any) -> Any:
    """The generation config of a base model or of a MedusaModel's base."""
    return getattr(model, "generation_config", None) or getattr(getattr(model, "base", None), "generation_config", None)


def eos_ids(model: Any, eos_token_id: int | list[int] | None = None) -> list[int]:
    """EOS ids to stop at: `eos_token_id` when given, else the generation config's (as generate() does)."""
    if eos_token_id is None:
        eos_token_id = getattr(_generation_config(model), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)]


def pad_token_id(model: Any, tokenizer: Any = None) -> int:
    """The id that fills padding: generation config, else tokenizer, else the first EOS id, else 0."""
    config = _generation_config(model)
    for candidate in (getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    eos = eos_ids(model)
    return eos[0] if eos else 0
