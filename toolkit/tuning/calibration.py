"""Calibration statistics: how often each path of head ranks would be accepted, measured on the base's greedy text.

At position t of a greedy sequence the base's own next token (t + 1) is the tree's root; head i's candidates at t guess
token t + i + 2. The *rank vector* of t holds, for each head i, the rank of the true token t + i + 2 among head i's
top-k (k when it is not there). A tree node (r0, ..., r_{d-1}) is accepted at t iff r_i equals the rank vector's i-th
entry for every i < d, so each position accepts exactly the prefixes of its rank vector up to the first miss. Counting
those prefixes over all positions gives every node's empirical *joint* acceptance probability (no independence
assumption between heads), stored as a sparse trie: a path with a zero count has only zero-count descendants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from medusa_toolkit import special_tokens
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.model.medusa_model import MedusaModel


class CalibrationError(ToolkitError, ValueError):
    """Calibration data is missing or unusable; the message says what to pass instead."""


@dataclass
class Calibration:
    """Acceptance counts over `num_positions` calibration positions.

    path_counts: {path of ranks: positions where the whole path is accepted} (only nonzero counts).
    rank_counts: [depth, top_k] positions where head i's rank-r candidate is the true token (marginal, per head).
    """

    path_counts: dict[tuple[int, ...], int]
    rank_counts: list[list[int]]
    num_positions: int
    num_sequences: int
    depth: int
    top_k: int
    dropped_positions: int = 0  # positions whose stored continuation was not the base's greedy one

    def probability(self, path: tuple[int, ...] | list[int]) -> float:
        """Empirical probability that node `path` is accepted (0 for paths never seen)."""
        return self.path_counts.get(tuple(path), 0) / max(1, self.num_positions)

    def head_accuracy(self) -> list[list[float]]:
        """[depth][top_k]: P(head i's rank-r candidate is the true token)."""
        n = max(1, self.num_positions)
        return [[c / n for c in row] for row in self.rank_counts]

    def expected_accept_length(self, paths: list[tuple[int, ...]] | list[list[int]]) -> float:
        """1 + the sum of the nodes' acceptance probabilities: mean tokens emitted per verification step."""
        return 1.0 + sum(self.probability(p) for p in paths)


def count_paths(ranks: torch.Tensor, top_k: int) -> tuple[dict[tuple[int, ...], int], list[list[int]]]:
    """Joint path counts and per-head rank counts from rank vectors [N, depth] (entries in 0..top_k, top_k = miss)."""
    rows = ranks.tolist()
    depth = ranks.shape[1] if ranks.dim() == 2 else 0
    counts: Counter = Counter()
    for row in rows:
        for d, r in enumerate(row):
            if r >= top_k:
                break
            counts[tuple(row[: d + 1])] += 1
    rank_counts = [[0] * top_k for _ in range(depth)]
    for row in rows:
        for i, r in enumerate(row):
            if r < top_k:
                rank_counts[i][r] += 1
    return dict(counts), rank_counts


def rank_vectors(
    medusa_logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Rank vectors [len(positions), depth] for one sequence.

    medusa_logits: [depth, T, V] head logits along the sequence; tokens: [T] the greedy sequence; positions: the t's
    to score (each needs tokens up to t + depth + 1).
    """
    depth = medusa_logits.shape[0]
    topk = medusa_logits[:, positions].topk(top_k, dim=-1).indices  # [depth, P, k]
    offsets = torch.arange(depth, device=tokens.device)[:, None] + 2
    targets = tokens[positions[None] + offsets]  # [depth, P]
    hit = topk == targets[..., None]
    # argmax of a bool row gives the first hit; rows with no hit get top_k (a miss).
    ranks = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(targets, top_k))
    return ranks.T.cpu()


@torch.inference_mode()
def calibrate_sequences(
    model: MedusaModel,
    sequences: list[torch.Tensor] | list[list[int]],
    starts: list[int],
    depth: int,
    top_k: int,
    progress: bool = True,
) -> Calibration:
    """Calibrate on token sequences assumed to be the base's greedy text from `starts[j]` on.

    One forward per sequence gives, at every position, the base's argmax and every head's top-k. Position t
    (t >= starts[j] - 1) counts only when tokens t + 1 ... t + depth + 1 all equal the base's argmax after their
    prefix, i.e. the stored text really is the greedy continuation there (true by construction for text the base
    generated greedily; numerical near-ties or sampled data fail it and are dropped, and counted in
    `dropped_positions`).
    """
    if depth > model.num_heads:
        raise CalibrationError(
            f"max depth {depth} exceeds the {model.num_heads} heads; use --max-depth <= {model.num_heads}"
        )
    if depth < 1 or top_k < 1:
        raise CalibrationError(f"need max depth >= 1 and top-k >= 1, got {depth} and {top_k}")
    if len(sequences) == 0:
        raise CalibrationError("no calibration sequences: pass prompts (--prompts FILE) or a data dir with rows")
    device = model.device
    all_ranks, dropped = [], 0
    for seq, start in tqdm(list(zip(sequences, starts)), desc="calibrate", unit="seq", disable=not progress):
        tokens = torch.as_tensor(seq, dtype=torch.long, device=device)
        last = tokens.numel() - depth - 2  # the last t with tokens up to t + depth + 1
        first = max(start - 1, 0)
        if last < first:
            continue
        out = model(tokens[None], position_ids=torch.arange(tokens.numel(), device=device)[None])
        greedy = out.logits[0].argmax(-1)  # [T]: greedy[t] is the base's choice for token t + 1
        consistent = torch.zeros_like(tokens, dtype=torch.bool)
        consistent[1:] = greedy[:-1] == tokens[1:]
        positions = torch.arange(first, last + 1, device=device)
        window = consistent[positions[:, None] + torch.arange(1, depth + 2, device=device)[None]].all(-1)
        dropped += int((~window).sum())
        positions = positions[window]
        if positions.numel():
            all_ranks.append(rank_vectors(out.medusa_logits[:depth, 0], tokens, positions, top_k))
    ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, depth, dtype=torch.long)
    if ranks.shape[0] == 0:
        raise CalibrationError(
            f"no usable calibration positions in {len(sequences)} sequence(s) ({dropped} dropped as not greedy): "
            f"sequences must be longer than prompt + max depth + 2 tokens and be the base's greedy text; "
            f"use more/longer prompts or a larger calibration max-new-tokens"
        )
    counts, rank_counts = count_paths(ranks, top_k)
    return Calibration(counts, rank_counts, ranks.shape[0], len(sequences), depth, top_k, dropped)


@torch.inference_mode()
def greedy_sequences(
    model: MedusaModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """The base's greedy continuation of each prompt (prompt included), one prompt at a time (no padding effects)."""
    if not prompts:
        raise CalibrationError(
            "no calibration prompts: pass --prompts FILE, --data DIR, or use the held-out chitchat set"
        )
    out = []
    eos, pad = special_tokens.eos_ids(model, eos_token_id) or None, special_tokens.pad_token_id(model)
    for ids in tqdm(prompts, desc="greedy", unit="prompt", disable=not progress):
        if len(ids) == 0:
            raise CalibrationError("a calibration prompt rendered to zero tokens; drop empty prompts")
        x = torch.as_tensor(ids, dtype=torch.long, device=model.device)[None]
        seq = model.base.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        out.append(seq[0])
    return out


def calibrate_prompts(
    model: MedusaModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    depth: int,
    top_k: int,
    eos_token_id: int | list[int] | None = None,
    progress: bool = True,
) -> Calibration:
    """Decode each prompt greedily (max_new_tokens + depth + 1 tokens, so late positions still see a full
    continuation), then calibrate on the generated part."""
    seqs = greedy_sequences(model, prompts, max_new_tokens + depth + 1, eos_token_id, progress)
    return calibrate_sequences(model, seqs, [len(p) for p in prompts], depth, top_k, progress)
