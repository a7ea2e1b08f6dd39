"""Self-generated prompts ("Magpie"): an aligned chat model, given its chat template up to where a user's message
begins, writes a plausible user message itself. No dataset needed, and the prompts are as diverse as what the model
expects users to ask (meal plans, code, travel, data questions, ...), which is what the heads must speed up.

Prompts are sampled (seeded: `torch.manual_seed(seed, round)` before each batch), then filtered, every drop counted
by reason: unfinished (no end of turn within max_tokens), empty, too short (< MIN_WORDS words), too long
(> max_prompt_tokens once rendered), duplicate (same text after normalising case and spaces) and near duplicate
(Jaccard similarity of word bigrams >= NEAR_DUPLICATE with a prompt already kept); the last round's extra
prompts are counted as surplus. sampled = kept + every drop.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch

from medusa_toolkit import special_tokens
from medusa_toolkit.errors import ToolkitError

MARKER = "<<MEDUSA-TOOLKIT-USER-TURN>>"
MIN_WORDS = 3
NEAR_DUPLICATE = 0.7
MAX_ROUNDS_FACTOR = 4  # give up after sampling this many times the prompts asked for


class MagpieError(ToolkitError, ValueError):
    """Self-generated prompts are impossible for this base (no chat template)."""


def pre_query_ids(tokenizer, system_prompt: str | None) -> list[int]:
    """The chat template rendered up to where the user's message begins (system prompt included where given)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MagpieError(
            "data source 'self' needs a chat model: this tokenizer has no chat template, so the model cannot be asked "
            "to write a user turn. Use another source (chitchat, file, hf, conversations) or a chat base"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": MARKER}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return tokenizer(text[: text.index(MARKER)], add_special_tokens=False)["input_ids"]


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _bigrams(text: str) -> set[tuple[str, ...]]:
    words = _normalise(text).split()
    return {tuple(words[i : i + 2]) for i in range(max(1, len(words) - 1))}


@torch.no_grad()
def self_prompts(
    model,
    tokenizer,
    count: int,
    *,
    system_prompt: str | None,
    temperature: float,
    top_p: float,
    max_tokens: int,
    batch_size: int,
    seed: int,
    fits: Callable[[str], bool],
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """`count` user prompts the model writes itself, and the reasons every dropped one was dropped.

    `fits(text)` says whether a prompt fits once rendered (the data stage's length limit).
    """
    prefix = pre_query_ids(tokenizer, system_prompt)
    eos = set(special_tokens.eos_ids(model))
    pad = special_tokens.pad_token_id(model, tokenizer)
    device = next(model.parameters()).device
    kept: list[str] = []
    seen: set[str] = set()
    shingles: list[set] = []
    dropped: Counter = Counter()
    rounds = 0
    while len(kept) < count and rounds * batch_size < MAX_ROUNDS_FACTOR * count:
        torch.manual_seed(seed * 1_000_003 + rounds)  # each round seeded: the same prompts for any run
        rounds += 1
        ids = torch.tensor([prefix] * batch_size, device=device)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_p=top_p,
            top_k=None, max_new_tokens=max_tokens, eos_token_id=list(eos) or None, pad_token_id=pad,
        )  # fmt: skip
        for row in out[:, len(prefix) :].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            text = tokenizer.decode(row[:stop] if stop is not None else row, skip_special_tokens=True).strip()
            reason = None
            if stop is None:
                reason = "unfinished"
            elif not text:
                reason = "empty"
            elif len(text.split()) < MIN_WORDS:
                reason = "too_short"
            elif not fits(text):
                reason = "too_long"
            elif _normalise(text) in seen:
                reason = "duplicate"
            else:
                grams = _bigrams(text)
                if any(len(grams & g) / len(grams | g) >= NEAR_DUPLICATE for g in shingles):
                    reason = "near_duplicate"
            if reason is None and len(kept) >= count:
                reason = "surplus"  # the last round sampled more than needed
            if reason is not None:
                dropped[reason] += 1
                continue
            kept.append(text)
            seen.add(_normalise(text))
            shingles.append(_bigrams(text))
        if progress is not None:
            progress(len(kept))
    reasons = ("unfinished", "empty", "too_short", "too_long", "duplicate", "near_duplicate", "surplus")
    counts = {"sampled": rounds * batch_size, "kept": len(kept), **{r: dropped.get(r, 0) for r in reasons}}
    return kept, counts
