"""Medusa decoding with sampling: lossless tree speculative sampling, and Medusa's lossy "typical acceptance".

Distributions. `p( . | context)` is the base model's next-token distribution after temperature, top-k and top-p
(`transformers` logits warpers, in the order `generate()` applies them). `q_d` is head d-1's distribution, processed
the same way, read at the hidden state that produced the step's root. All heads read that one hidden state, so q_d
does not depend on the tree path; it only has to be fixed before the step's candidates are drawn.

How a tree is used for sampling. A Medusa tree names nodes by top-k ranks, a deterministic proposal, not a sample
from q. For lossless sampling only the tree's *shape* is kept: at each step, for every depth d, `top_k` candidates
c[d][0..top_k-1] are drawn i.i.d. (with replacement) from q_d, and the node with path (r1, ..., rd) gets token
c[d][rd], exactly where greedy decoding would put head d-1's rank-rd token. A node's children are therefore i.i.d.
draws from q_{d+1}, tried in rank order, and independent of everything decided at depths <= d.

Acceptance ("lossless", SpecInfer's multi-candidate speculative sampling). From the root, with target r = p(.|path):
for each child x (i.i.d. ~ q) in order, accept x with probability min(1, r(x) / q(x)) and descend into it; on
rejection set r <- norm((r - q)+) and try the next child. When every child is rejected, or the node is a leaf, the
bonus token is drawn from the current r. Accepted tokens plus the bonus are emitted; the bonus is the next root.

Proof sketch (each emitted token ~ p given the tokens before it, hence the whole sequence ~ the base's sampler):
  Lemma (one trial). Let x ~ q, accept with prob min(1, r(x)/q(x)), else draw y ~ norm((r - q)+). Then the output
  is ~ r: P(out = t) = q(t) min(1, r(t)/q(t)) + (1 - sum_s min(q(s), r(s))) (r(t) - q(t))+ / sum_s (r(s) - q(s))+
  = min(q(t), r(t)) + (r(t) - q(t))+ = r(t), because sum_s (r - q)+ = 1 - sum_s min(q, r).
  Induction over the k children of a node (targets r_1 = p, r_{i+1} = norm((r_i - q)+)): the last fallback draws
  from r_{k+1}, so trials i+1..k plus the fallback output ~ r_{i+1}; x_i is independent of x_{i+1..k} (i.i.d.
  proposals), so the lemma applies to trial i with "else" output ~ r_{i+1}: trials i..k output ~ r_i. With i = 1 the
  token emitted after this node is ~ p. Descending into an accepted child only conditions on depth <= d randomness,
  and the child's children are fresh i.i.d. draws from q_{d+1}, so the argument repeats with p(.|path + x).
  (Drawing siblings *without* replacement would break the lemma: x_{i+1} would depend on x_i. With replacement a
  token rejected once has r_{i+1}(t) = 0, so a duplicate sibling is always rejected: wasted slot, still exact.)
  Numerics: if (r - q)+ sums to ~0 (r == q up to rounding, so rejection had ~0 probability) we fall back to r.

Acceptance ("typical", Medusa's, LOSSY): candidates are the heads' top-k (the tree's ranks, as in greedy), a
candidate x is accepted when p(x | path) > min(threshold, alpha * exp(-H(p))) (upstream defaults 0.09, 0.3), the
longest accepted path wins (ties: highest likelihood) and the bonus is sampled from p at its end. It favours the
heads' top tokens, so the output distribution differs from the base's (badly at high temperature); use it only when
speed matters more than the distribution. `verify/sampling_check.py` measures the difference.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from medusa_toolkit import special_tokens
from medusa_toolkit.decoding.generate import (
    Acceptance,
    DecodeState,
    MedusaGenerateOutput,
    accepted_run,
    decode,
    propose,
    resolve_tree,
    use_attention,
)
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree, TreeBuffers

ACCEPTANCE = ("lossless", "typical")
RESIDUAL_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------------
# Distributions


def logits_processor(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> LogitsProcessorList:
    """transformers' warpers for temperature, top-k and top-p, in generate()'s order; validates the values."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (for greedy decoding use medusa_generate)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def probabilities(logits: torch.Tensor, warpers: LogitsProcessorList) -> torch.Tensor:
    """Processed next-token probabilities (fp32) for logits [..., V]."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    flat = warpers(None, flat) if warpers else flat
    return torch.softmax(flat, -1).reshape(logits.shape)


def _residual(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    res = (r - q).clamp_min(0)
    total = res.sum()
    return res / total if total > RESIDUAL_EPS else r


def _draw(probs: torch.Tensor, generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    return torch.multinomial(probs, n, replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance rules


@lru_cache(maxsize=32)
def _children(paths: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """children[node]: child node indices in rank order (node i >= 1 is paths[i - 1], node 0 the root)."""
    node_of = {p: i + 1 for i, p in enumerate(paths)}
    node_of[()] = 0
    kids: list[list[tuple[int, int]]] = [[] for _ in range(len(paths) + 1)]
    for p, i in node_of.items():
        if p:
            kids[node_of[p[:-1]]].append((p[-1], i))
    return tuple(tuple(i for _, i in sorted(k)) for k in kids)


def accept_lossless(
    tree_tokens: list[int],
    p: torch.Tensor,
    q: torch.Tensor,
    children: tuple[tuple[int, ...], ...],
    depth_of: list[int],
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Multi-candidate rejection sampling down the tree. p: base probs [N, V]; q: head probs [depth, V].

    Returns the accepted nodes (root first) and the bonus token.
    """
    node, nodes = 0, [0]
    while True:
        r = p[node]
        for child in children[node]:
            x, qd = tree_tokens[child], q[depth_of[child] - 1]
            ratio = float(r[x]) / max(float(qd[x]), 1e-30)  # qd[x] > 0: x was drawn from qd
            if ratio >= 1 or float(torch.rand((), generator=generator)) < ratio:
                node = child
                nodes.append(child)
                break
            r = _residual(r, qd)
        else:
            return nodes, int(_draw(r, generator))


def accept_typical(
    tree_tokens: torch.Tensor, p: torch.Tensor, buffers: TreeBuffers, threshold: float, alpha: float
) -> list[int]:
    """Medusa's typical acceptance (lossy): the longest path whose candidates all pass the entropy threshold
    (ties: the highest likelihood). tree_tokens [N], p the base's processed probabilities at every node [N, V]."""
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [N]
    cut = torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))  # [N]
    retrieve = buffers.retrieve_indices
    cand = tree_tokens[retrieve]  # [L, D + 1]
    parent = retrieve[:, :-1]
    prob = p[parent, cand[:, 1:]]  # [L, D]: the base's prob of each candidate after its parent
    accepted = accepted_run(prob > cut[parent], buffers)  # [L]
    best_len = int(accepted.max()) if accepted.numel() else 0
    if best_len == 0:
        return [0]
    rows = (accepted == best_len).nonzero()[:, 0]
    loglik = prob[rows, :best_len].log().sum(-1)
    best = int(rows[loglik.argmax()])
    return retrieve[best, : best_len + 1].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The rules, plugged into medusa_toolkit.decoding.generate's one step


class LosslessSampling:
    """SpecInfer-style rule: candidates drawn i.i.d. from the heads, accepted by rejection sampling (exact)."""

    def __init__(self, warpers: LogitsProcessorList, tree: MedusaTree, generator: torch.Generator | None):
        self.warpers, self.generator, self.top_k, self.depth = warpers, generator, tree.top_k, tree.depth
        self.children = _children(tuple(tree.paths))
        self.depth_of = [0] + [len(path) for path in tree.paths]
        self.q: torch.Tensor | None = None  # [B, depth, V]: the heads' processed distributions of this step

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([_draw(p, self.generator) for p in probabilities(logits, self.warpers)])

    def propose(self, state: DecodeState, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
        self.q = probabilities(state.medusa_logits.movedim(1, 0), self.warpers)  # [B, depth, V]
        rows = []
        for root, q in zip(state.roots, self.q):
            drawn = _draw(q, self.generator, self.top_k) if self.depth else root[None][:0]
            rows.append(torch.cat([root[None], drawn.flatten()])[buffers.tree_indices])
        return torch.stack(rows)

    def accept(self, tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> Acceptance:
        p = probabilities(logits, self.warpers)  # [B, N, V]
        decided = [
            accept_lossless(tokens.tolist(), p_row, q_row, self.children, self.depth_of, self.generator)
            for tokens, p_row, q_row in zip(tree_tokens, p, self.q)
        ]
        return _as_acceptance(decided, buffers, tree_tokens.device)


class TypicalAcceptance:
    """Medusa's typical acceptance (LOSSY): the heads' top-k, kept when the base finds them likely enough."""

    def __init__(self, warpers: LogitsProcessorList, generator: torch.Generator | None, threshold: float, alpha: float):
        self.warpers, self.generator, self.threshold, self.alpha = warpers, generator, threshold, alpha

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([_draw(p, self.generator) for p in probabilities(logits, self.warpers)])

    def propose(self, state: DecodeState, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
        return propose(state.roots, state.medusa_logits, tree, buffers)

    def accept(self, tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> Acceptance:
        p = probabilities(logits, self.warpers)
        decided = []
        for tokens, p_row in zip(tree_tokens, p):
            nodes = accept_typical(tokens, p_row, buffers, self.threshold, self.alpha)
            decided.append((nodes, int(_draw(p_row[nodes[-1]], self.generator))))
        return _as_acceptance(decided, buffers, tree_tokens.device)


def _as_acceptance(decided: list[tuple[list[int], int]], buffers: TreeBuffers, device: torch.device) -> Acceptance:
    """Per-row (accepted nodes, next root) as the batched Acceptance decode_step commits."""
    width = buffers.retrieve_indices.shape[1]
    nodes = torch.zeros(len(decided), width, dtype=torch.long, device=device)
    for b, (path, _) in enumerate(decided):
        nodes[b, : len(path)] = torch.tensor(path, device=device)
    counts = torch.tensor([len(path) for path, _ in decided], device=device)
    return Acceptance(nodes, counts, torch.tensor([bonus for _, bonus in decided], device=device))


# ----------------------------------------------------------------------------------------------------------------------
# The entry point


@torch.inference_mode()
def medusa_sample(
    model: MedusaModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    tree: MedusaTree | str | list | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    acceptance: str = "lossless",
    eos_token_id: int | list[int] | None = None,
    attn_implementation: str | None = None,
    typical_threshold: float = 0.09,
    typical_alpha: float = 0.3,
) -> MedusaGenerateOutput:
    """Sample one prompt (batch 1) with Medusa. "lossless" has the exact distribution of
    `model.base.generate(do_sample=True, temperature=..., top_p=..., top_k=...)`; "typical" is Medusa's faster, lossy
    rule (see the module docstring). `generator` seeds every random draw (candidates, acceptance, bonus tokens).
    Other arguments as in `medusa_generate`.
    """
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"medusa_sample takes one non-empty prompt [1, L], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    warpers = logits_processor(temperature, top_p, top_k)
    tree = resolve_tree(tree, model)
    input_ids = input_ids.to(model.device)
    if acceptance == "lossless":
        rule = LosslessSampling(warpers, tree, generator)
    else:
        rule = TypicalAcceptance(warpers, generator, typical_threshold, typical_alpha)
    eos = set(special_tokens.eos_ids(model, eos_token_id))
    with use_attention(model, attn_implementation) as attn:
        out = decode(model, input_ids, None, max_new_tokens, tree, eos, attn, rule)
    tokens = torch.tensor(out.new_tokens[0], dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids[0], tokens])[None]
    return MedusaGenerateOutput(sequences, out.accept_lengths[0], tokens.numel(), out.wall_time, out.prefill_time)
