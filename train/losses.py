"""Medusa training objective: per-head `ce` or `kl` losses with decay**k weights, plus top-1/top-5 counts.

Head k at position t guesses the token at t + k + 2. `ce` compares it with the target there: the token the base
emits at that position (on the base's own greedy text, the token itself; on recorded text, the base's argmax);
`kl` with the base model's own distribution at position t + k + 1 (the base's next-token guess for the same token),
computed from the same final hidden states. A position counts only when the TARGET position is in the loss mask.
Only masked positions are projected onto the vocabulary: the [N, V] projection is most of the cost.

Normalisation: every target token of an optimizer step weighs the same, however the step's sequences are split into
micro-batches and ranks. The trainer passes each head's target count over the whole step (all micro-batches, all
ranks) as `norm`; the objective returns sum(loss over this micro-batch's tokens) / norm, and the trainer undoes
DeepSpeed's averaging over micro-batches and ranks (see `trainer.train_step`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.medusa_model import BaseHead

# Per head: loss_sum, count, top1_correct, top5_correct.
STATS = 4


def target_offset(k: int) -> int:
    """Head k at position t predicts the token at t + target_offset(k)."""
    return k + 2


def head_weights(num_heads: int, decay: float) -> list[float]:
    """Medusa-2 per-head loss weights decay**k."""
    return [decay**k for k in range(num_heads)]


class MedusaObjective(nn.Module):
    """Heads + the loss, as one module for the DeepSpeed engine. The base lm_head is frozen tensors, not parameters.

    forward(hidden [B,T,H], targets [B,T], loss_mask [B,T], norm [num_heads] | None)
        targets[b, t]: the token the base emits at t (its own greedy text: the input ids; recorded text: its argmax).
        -> (weighted loss, stats [num_heads, 4]).
    `base_head`: the base's `BaseHead` (weight, bias, logit scale, soft-cap), or a bare lm_head weight tensor.
    """

    def __init__(
        self,
        heads: MedusaHeads,
        base_head: BaseHead | torch.Tensor,
        loss: str = "ce",
        decay: float = 0.8,
        kl_temperature: float = 1.0,
        kl_top_k: int | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.heads = heads
        if isinstance(base_head, torch.Tensor):
            base_head = BaseHead(base_head, softcap=softcap)
        # Plain attributes (not parameters/buffers): DeepSpeed must neither train, shard nor broadcast them.
        bias = None if base_head.bias is None else base_head.bias.detach()
        self.base_head = BaseHead(base_head.weight.detach(), bias, base_head.scale, base_head.softcap)
        self.lm_head_weight = self.base_head.weight
        # Truncated heads score only token_map's tokens: shared ones through those rows of the base's head, and a
        # target outside the map is one no head can guess (no loss, counted as a miss); kl compares distributions
        # over the map.
        self.token_map = heads.token_map
        self.heads_head = self.base_head.rows(heads.token_map)
        self.index_of = None
        if heads.token_map is not None:
            self.index_of = torch.full((heads.config.vocab_size,), -1, dtype=torch.long)
            self.index_of[heads.token_map] = torch.arange(len(heads.token_map))
        self.loss = loss
        self.weights = head_weights(heads.num_heads, decay)
        self.kl_temperature = kl_temperature
        self.kl_top_k = kl_top_k

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The base's logits from its last hidden states (the same `BaseHead` inference uses)."""
        return self.base_head(h)

    def project(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Head k's logits over the tokens it scores (the whole vocabulary, or the token_map's)."""
        if self.heads.head_type == "shared_lm_head":
            return self.heads_head(h)
        return self.heads.heads[k][self.heads.num_layers](h)

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, norm: torch.Tensor | None = None
    ):
        """`norm[k]`: head k's target count that this micro-batch's summed loss is divided by (the whole step's, so
        tokens weigh equally across micro-batches and ranks); None: this micro-batch's own count (a per-token mean)."""
        dtype = next(self.heads.parameters()).dtype
        hidden = hidden.to(dtype)
        per_head = self.heads.hidden(hidden)  # [K, B, T, H]: cheap, the vocab projection comes after masking
        total = hidden.new_zeros((), dtype=torch.float32)
        stats = torch.zeros(self.heads.num_heads, STATS, dtype=torch.float64, device=hidden.device)
        T = hidden.shape[1]
        for k in range(self.heads.num_heads):
            shift = min(target_offset(k), T)
            mask = loss_mask[:, shift:].bool()
            n = int(mask.sum())
            # Always project, even nothing: under ZeRO-3 every rank must call every submodule (parameter gathers).
            logits = self.project(k, per_head[k, :, : T - shift][mask]).float()  # [N, V]
            if n == 0:
                total = total + logits.sum() * 0.0
                continue
            target = targets[:, shift:][mask]
            if self.loss == "ce":
                index = target if self.index_of is None else self.index_of.to(target.device)[target]
                loss_sum = F.cross_entropy(logits, index, reduction="sum", ignore_index=-1)
            else:
                teacher = self.heads_head(hidden[:, shift - 1 : T - 1][mask]).float()  # base's guess, same token
                loss_sum = kl_loss(logits, teacher, self.kl_temperature, self.kl_top_k, reduction="sum")
            denom = n if norm is None else float(norm[k])
            total = total + self.weights[k] * loss_sum / max(denom, 1.0)
            with torch.no_grad():
                top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                if self.token_map is not None:
                    top5 = self.token_map.to(top5.device)[top5]  # back to token ids
                stats[k, 0] += loss_sum.detach().double()
                stats[k, 1] += n
                stats[k, 2] += (top5[:, 0] == target).sum()
                stats[k, 3] += (top5 == target[:, None]).any(-1).sum()
        return total, stats


def target_counts(loss_masks: list[list[int]], num_heads: int, max_len: int) -> torch.Tensor:
    """Each head's number of target positions over these sequences (cut to max_len as `collate` does) [num_heads]:
    the positions t whose target t + target_offset(k) is in the loss mask."""
    counts = torch.zeros(num_heads, dtype=torch.float64)
    for m in loss_masks:
        m = m[:max_len]
        for k in range(num_heads):
            counts[k] += sum(m[target_offset(k) :])
    return counts


def kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(teacher || student) per position, averaged (reduction "sum": summed); with top_k the teacher keeps only its
    k best tokens (renormalised).

    Scaled by temperature**2 (Hinton) so the gradient size does not depend on the temperature.
    """
    s = F.log_softmax(student / temperature, dim=-1)
    if top_k is not None and top_k < teacher.shape[-1]:
        values, index = teacher.topk(top_k, dim=-1)
        p = F.softmax(values / temperature, dim=-1)
        kl = (p * (p.clamp_min(1e-30).log() - s.gather(-1, index))).sum(-1)
    else:
        logp = F.log_softmax(teacher / temperature, dim=-1)
        kl = (logp.exp() * (logp - s)).sum(-1)
    return (kl.sum() if reduction == "sum" else kl.mean()) * temperature**2
