"""Heads fitted in seconds to a base's own greedy text: enough for multi-token acceptance without a training run.

The one head-fitting helper of the tests (`testing.tiny.fitted`), the benchmarks (`bench_batch.py --tiny`) and the GPU
check's end-to-end section (a SmolLM2-shaped random base on the GPU). It is a plain cross-entropy loop on purpose:
testing/ imports no job, so not the train stage's objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from medusa_toolkit.model.heads import MedusaHeads


@torch.no_grad()
def greedy_corpus(
    base: Any, num: int = 16, prompt_len: int = 4, new: int = 48, seed: int = 0, low: int = 0
) -> torch.Tensor:
    """The base's own greedy continuations of `num` random prompts (ids in [low, vocab)): what Medusa heads learn to
    predict. [num, prompt_len + new] on the base's device, exactly `new` tokens each (EOS does not stop a row)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(low, base.config.vocab_size, (num, prompt_len), generator=g).to(base.device)
    pad = base.config.pad_token_id
    return base.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new, min_new_tokens=new,
        pad_token_id=0 if pad is None else pad,
    )  # fmt: skip


@dataclass
class HeadFit:
    """What `fit_heads_on` did: the heads (eval mode), the optimiser steps taken, and each head's top-1 accuracy on
    the fitting text after the last step."""

    heads: MedusaHeads
    steps: int
    top1: list[float]


def fit_heads_on(
    base: Any,
    tokens: torch.Tensor,
    num_heads: int = 4,
    steps: int = 150,
    seed: int = 0,
    head_type: str = "per_head_lm_head",
    lr: float = 3e-3,
    deadline: float | None = None,
) -> HeadFit:
    """Self-distil `num_heads` heads on `tokens` [B, T] (the base's own text) for up to `steps` Adam steps: head k at
    position t learns token t + k + 2. Heads start as copies of the base's lm_head and live on the base's device.

    `deadline`: a `time.perf_counter()` value after which no further step starts (at least one always runs).
    """
    torch.manual_seed(seed)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, num_heads, head_type=head_type)
    heads.init_from_lm_head(base.lm_head.weight)
    heads.to(base.device)
    with torch.no_grad():
        hidden = base.get_decoder()(tokens).last_hidden_state
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    done = 0
    while done < steps and (done == 0 or deadline is None or time.perf_counter() < deadline):
        logits = heads(hidden, base.lm_head)  # [H, B, T, V]
        loss = 0.0
        for k in range(num_heads):
            shift = k + 2
            loss = loss + torch.nn.functional.cross_entropy(
                logits[k, :, :-shift].reshape(-1, logits.shape[-1]), tokens[:, shift:].reshape(-1)
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    heads.eval()
    with torch.no_grad():
        logits = heads(hidden, base.lm_head)
        top1 = [
            (logits[k, :, : -(k + 2)].argmax(-1) == tokens[:, k + 2 :]).float().mean().item() for k in range(num_heads)
        ]
    return HeadFit(heads, done, top1)


def fit_heads(
    base: Any, num_heads: int = 4, steps: int = 150, seed: int = 0, head_type: str = "per_head_lm_head"
) -> MedusaHeads:
    """Heads fitted for `steps` Adam steps on the base's greedy text (`greedy_corpus(base, seed=seed)`)."""
    return fit_heads_on(base, greedy_corpus(base, seed=seed), num_heads, steps, seed, head_type).heads
