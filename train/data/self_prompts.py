"""Self-generated prompts ("Magpie"): an aligned chat model, given its chat template up to where a user's message
begins, writes a plausible user message itself. No dataset needed, and the prompts are as diverse as what the model
expects users to ask (meal plans, code, travel, data questions, ...), which is what the heads must speed up.

Two writers, one filter. In-process (`write`, data.engine: hf) the base samples a round of prompts with
its own sampling loop (`sample_turns`: seeded per round, finished rows leave the batch, top-p decided among the
most likely tokens only). Through a serving engine
(`write_with_server`, data.engine: openai) the same template text goes as a raw prompt to the server's
`/completions`, one request per prompt, each with its own seed derived from data.seed and stopping at the end-of-turn
token's text. Either way every sampled prompt then passes `PromptFilter`, every drop counted by reason: unfinished (no
end of turn within max_tokens), empty, too short (< MIN_WORDS words), too long (> max_prompt_tokens once rendered),
duplicate (same text after normalising case and spaces) and near duplicate (Jaccard similarity of word bigrams >=
NEAR_DUPLICATE with a prompt already kept); the last round's extra prompts are counted as surplus (a round is sized
from the keep rate so far, so there are few). sampled = kept +
every drop.

Reproducibility through an engine is the server's: vLLM seeds each request on its own, so the same data.seed gives
the same prompts at any concurrency. `transformers serve` sets one process-wide torch seed per request, so its
prompts repeat only with data.concurrency: 1 and without --continuous-batching (which ignores the seed); it also
samples only where the model's generation_config.json says `do_sample: true` (temperature alone does not switch
sampling on), else every request gives the same greedy prompt and all but one are counted as duplicates.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from medusa_toolkit import special_tokens
from medusa_toolkit.errors import ToolkitError

MARKER = "<<MEDUSA-TOOLKIT-USER-TURN>>"
MIN_WORDS = 3
NEAR_DUPLICATE = 0.7
MAX_ROUNDS_FACTOR = 4  # give up after sampling this many times the prompts asked for
ROUND_MARGIN = 1.2  # a round sized from the keep rate samples this much more than it expects to need
REASONS = ("unfinished", "empty", "too_short", "too_long", "duplicate", "near_duplicate", "surplus")


class SelfPromptError(ToolkitError, ValueError):
    """Self-generated prompts are impossible for this base (no chat template)."""


def pre_query_text(tokenizer, system_prompt: str | None) -> str:
    """The chat template rendered (as text) up to where the user's message begins, system prompt included."""
    if not getattr(tokenizer, "chat_template", None):
        raise SelfPromptError(
            "data source 'self' needs a chat model: this tokenizer has no chat template, so the model cannot be asked "
            "to write a user turn. Use another source (chitchat, file, hf, conversations) or a chat base"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": MARKER}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return text[: text.index(MARKER)]


def pre_query_ids(tokenizer, system_prompt: str | None) -> list[int]:
    """`pre_query_text` as token ids."""
    return tokenizer(pre_query_text(tokenizer, system_prompt), add_special_tokens=False)["input_ids"]


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _bigrams(text: str) -> set[tuple[str, ...]]:
    words = _normalise(text).split()
    return {tuple(words[i : i + 2]) for i in range(max(1, len(words) - 1))}


class PromptFilter:
    """Keeps up to `count` sampled prompts that pass every filter, and counts every other one by its reason.

    `fits(text)` says whether a prompt fits once rendered (the data stage's length limit).
    """

    def __init__(self, count: int, fits: Callable[[str], bool]):
        self.count, self.fits = count, fits
        self.kept: list[str] = []
        self.seen: set[str] = set()
        self.shingles: list[set] = []
        self.dropped: Counter = Counter()
        self.sampled = 0

    def offer(self, text: str, finished: bool) -> None:
        """One sampled prompt (already cut at its end of turn); `finished`: the model ended its turn."""
        self.sampled += 1
        text = text.strip()
        reason = None
        if not finished:
            reason = "unfinished"
        elif not text:
            reason = "empty"
        elif len(text.split()) < MIN_WORDS:
            reason = "too_short"
        elif not self.fits(text):
            reason = "too_long"
        elif _normalise(text) in self.seen:
            reason = "duplicate"
        else:
            grams = _bigrams(text)
            if any(len(grams & g) / len(grams | g) >= NEAR_DUPLICATE for g in self.shingles):
                reason = "near_duplicate"
        if reason is None and len(self.kept) >= self.count:
            reason = "surplus"  # the last round sampled more than needed
        if reason is not None:
            self.dropped[reason] += 1
            return
        self.kept.append(text)
        self.seen.add(_normalise(text))
        self.shingles.append(_bigrams(text))

    def counts(self) -> dict[str, int]:
        """sampled, kept and every drop reason (zero included, so summaries always have the same keys)."""
        return {"sampled": self.sampled, "kept": len(self.kept), **{r: self.dropped.get(r, 0) for r in REASONS}}


def round_size(batch_size: int, count: int, kept: int, sampled: int) -> int:
    """Rows for the next round: a full batch, or fewer once the keep rate so far says fewer will do (with a margin
    of ROUND_MARGIN), so the last round does not sample a whole batch to keep a handful (its extras are surplus)."""
    if kept == 0:
        return batch_size
    return max(1, min(batch_size, math.ceil((count - kept) * sampled / kept * ROUND_MARGIN)))


def _collect(
    count: int,
    batch_size: int,
    sample_round: Callable[[int, int], list[tuple[str, bool]]],
    fits: Callable[[str], bool],
    progress: Callable[[int], None] | None,
) -> tuple[list[str], dict[str, int]]:
    """Rounds of `sample_round(round, rows)` ((text, finished) pairs) through one `PromptFilter` until `count` are
    kept or MAX_ROUNDS_FACTOR x `count` were sampled."""
    kept = PromptFilter(count, fits)
    rounds = 0
    while len(kept.kept) < count and kept.sampled < MAX_ROUNDS_FACTOR * count:
        for text, finished in sample_round(rounds, round_size(batch_size, count, len(kept.kept), kept.sampled)):
            kept.offer(text, finished)
        rounds += 1
        if progress is not None:
            progress(len(kept.kept))
    return kept.kept, kept.counts()


@dataclass(frozen=True)
class PromptSampling:
    """How both writers sample a round of prompts and which ones they keep."""

    system_prompt: str | None
    temperature: float
    top_p: float
    max_tokens: int  # the longest prompt the model may write; longer ones are unfinished
    batch_size: int  # prompts per round (in-process: rows of one batch; engine: concurrent requests)
    seed: int
    fits: Callable[[str], bool]  # whether a prompt fits data.max_prompt_tokens once rendered
    progress: Callable[[int], None] | None = None  # called with the number kept after each round


NUCLEUS_CANDIDATES = 1024  # top-p is decided among this many most likely tokens, the whole vocabulary only if short


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """generate()'s top-p nucleus (TopPLogitsWarper) of logits [B, V] after temperature: probabilities [B, K], most
    likely first and 0 outside the nucleus, and their token ids [B, K].

    A token is kept while the mass before it is < top_p. The nucleus almost always lies within the NUCLEUS_CANDIDATES
    most likely tokens, so only those are sorted (a full sort of a 49k vocabulary per row per token, plus
    multinomial's random numbers over all of it, cost more than the model's forward at batch 32 on a CPU); when some
    row's candidates hold less than top_p, the whole vocabulary is sorted instead.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, index = probs.topk(k, dim=-1)
    if k < probs.shape[-1] and bool((top.sum(-1) < top_p).any()):
        top, index = probs.sort(dim=-1, descending=True)
    return top * ((top.cumsum(-1) - top) < top_p), index


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row [B] from the `nucleus` of logits [B, V], by inverse CDF at `uniform` [B] in [0, 1)."""
    top, index = nucleus(logits, temperature, top_p)
    cdf = top.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp(max=top.shape[-1] - 1)
    return index.gather(1, pick)[:, 0]


@torch.no_grad()
def sample_turns(
    model, prefix: list[int], rows: int, max_tokens: int, temperature: float, top_p: float, eos: set[int], seed: int
) -> list[tuple[list[int], bool]]:
    """`rows` continuations of one shared `prefix`: (token ids before the end of turn, whether the turn ended).

    The prefix runs once and its keys/values are copied to every row. A row leaves the batch at its end of turn, so
    finished rows stop costing compute (generate() computes every row until the last one ends). Each step draws one
    uniform number per original row from a generator seeded with `seed`, so a row's text depends only on the seed,
    its index and its own tokens, never on which other rows are still running.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.config)
    out = model(torch.tensor([prefix], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(rows)
    logits = out.logits[:, -1].expand(rows, -1)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    alive = list(range(rows))
    for step in range(max_tokens):
        uniform = torch.rand(rows, generator=generator)[alive]
        chosen = nucleus_sample(logits, temperature, top_p, uniform.to(logits.device))
        still = []
        for i, (row, token) in enumerate(zip(alive, chosen.tolist())):
            if token in eos:
                finished[row] = True
            else:
                tokens[row].append(token)
                still.append(i)
        if not still or step == max_tokens - 1:
            break
        if len(still) < len(alive):
            keep = torch.tensor(still, device=device)
            cache.batch_select_indices(keep)
            chosen, alive = chosen[keep], [alive[i] for i in still]
        position = torch.full((len(alive), 1), len(prefix) + step, device=device)
        logits = model(chosen[:, None], position_ids=position, cache=cache, use_cache=True).logits[:, -1]
    return list(zip(tokens, finished))


def write(model, tokenizer, count: int, how: PromptSampling) -> tuple[list[str], dict[str, int]]:
    """`count` user prompts the in-process model writes itself, and the reasons every dropped one was dropped."""
    prefix = pre_query_ids(tokenizer, how.system_prompt)
    eos = set(special_tokens.eos_ids(model))

    def sample_round(r: int, rows: int) -> list[tuple[str, bool]]:
        turns = sample_turns(
            model, prefix, rows, how.max_tokens, how.temperature, how.top_p, eos, how.seed * 1_000_003 + r
        )
        return [(tokenizer.decode(ids, skip_special_tokens=True), done) for ids, done in turns]

    return _collect(count, how.batch_size, sample_round, how.fits, how.progress)


def write_with_server(engine, tokenizer, count: int, how: PromptSampling) -> tuple[list[str], dict[str, int]]:
    """`count` user prompts the base behind `engine` (an `engine.OpenAIClient`) writes itself, filtered and counted as
    `self_prompts` does. Request j of round r is seeded with seed * 1_000_003 + r * batch_size + j: a different seed
    for every request, the same ones on every run (whether the server honours them: see the module docstring)."""
    prompt = pre_query_text(tokenizer, how.system_prompt)
    # Servers strip special tokens from the text; asking them to stop at the end-of-turn text also covers a server
    # whose generation config ends on another token than the chat template's end of turn.
    stop = [t for t in (tokenizer.decode([e]) for e in engine.eos) if t.strip()]

    def sample_round(r: int, rows: int) -> list[tuple[str, bool]]:
        seeds = [how.seed * 1_000_003 + r * how.batch_size + j for j in range(rows)]
        return engine.complete_text(
            prompt, seeds, temperature=how.temperature, top_p=how.top_p, max_tokens=how.max_tokens, stop=stop
        )

    return _collect(count, how.batch_size, sample_round, how.fits, how.progress)
