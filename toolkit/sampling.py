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
speed matters more than the distribution. `verify/distribution.py` measures the difference.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from medusa_toolkit.decoding import (
    MedusaGenerateOutput,
    _eos_ids,
    _truncate,
    keep_cache_positions,
    propose,
    use_attention,
    verify,
)
from medusa_toolkit.medusa_model import MedusaModel
from medusa_toolkit.tree import MedusaTree

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
    tree_tokens: torch.Tensor,
    p: torch.Tensor,
    retrieve: torch.Tensor,
    path_lengths: torch.Tensor,
    threshold: float,
    alpha: float,
) -> list[int]:
    """Medusa's typical acceptance (lossy): the longest path whose candidates all pass the entropy threshold."""
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [N]
    cut = torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))  # [N]
    cand = tree_tokens[retrieve]  # [L, D + 1]
    parent = retrieve[:, :-1]
    prob = p[parent, cand[:, 1:]]  # [L, D]: the base's prob of each candidate after its parent
    depth = retrieve.shape[1] - 1
    real = torch.arange(depth)[None] < (path_lengths - 1)[:, None]
    ok = (prob > cut[parent]) & real
    accepted = ok.int().cumprod(-1).sum(-1)  # [L]
    best_len = int(accepted.max()) if accepted.numel() else 0
    if best_len == 0:
        return [0]
    rows = (accepted == best_len).nonzero()[:, 0]
    loglik = prob[rows, :best_len].log().sum(-1)
    best = int(rows[loglik.argmax()])
    return retrieve[best, : best_len + 1].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The loop


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
    tree = MedusaTree.resolve(tree, model.num_heads)
    device = model.device
    input_ids = input_ids.to(device)
    buffers = tree.buffers(device)
    children = _children(tuple(tree.paths))
    depth_of = [0] + [len(path) for path in tree.paths]
    eos = _eos_ids(model, eos_token_id)

    with use_attention(model, attn_implementation) as attn:
        start = time.perf_counter()
        cache = DynamicCache(config=model.base.config)
        positions = torch.arange(input_ids.shape[1], device=device)[None]
        out = model(input_ids, position_ids=positions, cache=cache, logits_to_keep=1)
        root = _draw(probabilities(out.logits[0, -1], warpers), generator)
        medusa_logits = out.medusa_logits[:, 0, -1]
        prefill_time = time.perf_counter() - start

        new_tokens, done = _truncate(root, eos, max_new_tokens)
        pieces, accept_lengths = [input_ids[0], new_tokens], []
        produced, prefix_len = new_tokens.numel(), input_ids.shape[1]
        while not done and produced < max_new_tokens:
            if acceptance == "lossless":
                q = probabilities(medusa_logits[: tree.depth], warpers)  # [depth, V]
                drawn = _draw(q, generator, tree.top_k) if tree.depth else root[:0]
                tree_tokens = torch.cat([root, drawn.flatten()])[buffers.tree_indices]
            else:
                tree_tokens = propose(root, medusa_logits, tree, buffers)
            logits, hidden = verify(model, tree_tokens, prefix_len, buffers, cache, attn)
            p = probabilities(logits, warpers)  # [N, V]
            if acceptance == "lossless":
                nodes, bonus = accept_lossless(tree_tokens.tolist(), p, q, children, depth_of, generator)
            else:
                nodes = accept_typical(
                    tree_tokens.cpu(), p.cpu(), buffers.retrieve_indices.cpu(), buffers.path_lengths.cpu(),
                    typical_threshold, typical_alpha,
                )  # fmt: skip
                bonus = int(_draw(p[nodes[-1]], generator))
            kept = torch.tensor(nodes, device=device)
            keep_cache_positions(cache, prefix_len, kept)
            prefix_len += len(nodes)
            step = torch.cat([tree_tokens[kept[1:]], torch.tensor([bonus], device=device)])
            emitted, done = _truncate(step, eos, max_new_tokens - produced)
            accept_lengths.append(emitted.numel())
            pieces.append(emitted)
            produced += emitted.numel()
            root, medusa_logits = step[-1:], model.medusa_logits(hidden[nodes[-1]])
        wall = time.perf_counter() - start

    return MedusaGenerateOutput(torch.cat(pieces)[None], accept_lengths, produced, wall, prefill_time)
