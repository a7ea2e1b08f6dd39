"""Exact Medusa decoding, in plain functions: one step, one loop, for one prompt or a padded batch.

After a prefill has produced each row's *root* (the base model's next token) and the heads' guesses, one step is:
  1. propose:  the heads' top-k candidates, arranged as the tree's nodes             -> tree tokens [B, N]
  2. verify:   ONE base forward over all N tree tokens with the tree mask and depth-based positions
  3. accept:   per row, the longest root-to-leaf path the acceptance rule accepts, and the next root (greedy: every
               candidate equals the base's argmax after its parent; the next root is the argmax after the last one)
  4. commit:   emit the accepted tokens plus the next root; keep only the accepted positions in the KV cache.
Every emitted token is an argmax of the base model given exactly the tokens before it, so the output equals plain
greedy decoding token for token; the heads only decide how many tokens one forward yields.

`decode_step` is that step for any acceptance rule (greedy here; lossless and typical sampling in
medusa_toolkit.decoding.sampling) and `decode` the loop around it (EOS, token budgets, finished rows leaving the batch); the
tree tuner times the same `decode_step`. Every row keeps its own KV length in a `RowCache`, so rows of a batch accept
different numbers of tokens without re-padding, and a row equals that prompt decoded alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from medusa_toolkit import special_tokens
from medusa_toolkit.config import ATTN_IMPLEMENTATIONS
from medusa_toolkit.decoding.cpu_attention import CPU_SDPA_NAME, register_cpu_sdpa
from medusa_toolkit.decoding.row_cache import RowCache
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree, TreeBuffers, TreeError

# User-facing names (config.ATTN_IMPLEMENTATIONS). "medusa_flash_decoding" is registered with transformers under the
# kernel package's ATTN_NAME, which avoids the substring "flash" (transformers routes any such name to its
# FlashAttention code paths).


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class MedusaGenerateOutput:
    """One prompt. sequences: prompt + new tokens [1, L]. accept_lengths[i]: tokens emitted by step i (>= 1)."""

    sequences: torch.Tensor
    accept_lengths: list[int] = field(default_factory=list)
    new_tokens: int = 0
    wall_time: float = 0.0
    prefill_time: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        """Tokens per verification step (1.0 means the heads never helped)."""
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else float("nan")


@dataclass
class BatchGenerateOutput:
    """A batch. sequences: [B, L] each row's prompt (padding removed) + new tokens, right-padded with `pad_token_id`.

    lengths[b]: real tokens in row b. accept_lengths[b][i]: tokens row b emitted at its verification step i.
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    accept_lengths: list[list[int]]
    new_tokens: list[int]
    prompt_lengths: list[int]
    pad_token_id: int = 0
    wall_time: float = 0.0
    prefill_time: float = 0.0
    forwards: int = 0  # verification forwards of the whole batch (a step with any row still active counts once)

    def rows(self) -> list[torch.Tensor]:
        """Each row's tokens without padding."""
        return [self.sequences[b, : int(n)] for b, n in enumerate(self.lengths)]

    @property
    def steps(self) -> list[int]:
        return [len(a) for a in self.accept_lengths]

    @property
    def mean_accept_length(self) -> float:
        """Tokens per verification step over all rows (1.0 means the heads never helped)."""
        total = sum(sum(a) for a in self.accept_lengths)
        return total / max(1, sum(len(a) for a in self.accept_lengths))

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.wall_time if self.wall_time > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------------
# The pieces of a step


@dataclass
class DecodeState:
    """What the next step starts from: the cache, each row's root [B] and the heads' logits there [depth, B, V]."""

    cache: RowCache
    roots: torch.Tensor
    medusa_logits: torch.Tensor


@dataclass
class Acceptance:
    """What a rule decided for each row: accepted path nodes [B, D + 1] (root first, valid up to counts[b]), how many
    [B], and the next root [B] (the token the base emits after the last accepted node)."""

    nodes: torch.Tensor
    counts: torch.Tensor
    next_roots: torch.Tensor


class AcceptanceRule(Protocol):
    """How a step proposes tree tokens and decides what to accept: greedy below, sampling in medusa_toolkit.decoding.sampling."""

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's root [B] from the base's logits after the prompt [B, V]."""

    def propose(self, state: DecodeState, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
        """Tree tokens [B, N]."""

    def accept(self, tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> Acceptance:
        """Accepted paths from the base's logits at every tree node [B, N, V]."""


def row_tree_mask(buffers: TreeBuffers, lens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense additive mask [B, 1, N, max(lens) + N]: row b sees its lens[b] prefix keys, then its tree ancestors."""
    n = buffers.attn_mask.shape[0]
    s = int(lens.max()) + n
    j = torch.arange(s, device=lens.device)[None] - lens[:, None]  # [B, S]: index among the tree tokens
    in_tree = (j >= 0) & (j < n)
    tree = buffers.attn_mask[:, j.clamp(0, n - 1)].permute(1, 0, 2)  # [B, N, S]
    allowed = (j < 0)[:, None, :] | (in_tree[:, None, :] & tree)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=lens.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def attn_inputs(attn: str, buffers: TreeBuffers, lens: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments that carry the tree mask to the attention: dense for sdpa/eager, compact for the kernel."""
    n = buffers.attn_mask.shape[0]
    if attn == "medusa_flash_decoding":
        return {"attention_mask": None, "medusa_tree_mask": buffers.attn_mask, "medusa_kv_lens": lens + n}
    if n == 1 and lens.shape[0] == 1:
        # The 1-node tree of one row is a plain decoding step: its token sees every cached key, so no mask is needed
        # and the base runs exactly as in its own greedy loop (the tuner's fallback costs nothing extra).
        return {"attention_mask": None}
    return {"attention_mask": row_tree_mask(buffers, lens, dtype)}


def resolve_tree(spec: MedusaTree | str | list | None, model: MedusaModel) -> MedusaTree:
    """The tree to decode with, checked against the heads before any decoding: no deeper than the heads, and drawing
    no more candidates per head than the heads score (a rank beyond their vocabulary is bad input, not a crash)."""
    tree = MedusaTree.resolve(spec, model.num_heads)
    if model.heads is not None and tree.depth and tree.top_k > model.heads.head_vocab_size:
        raise TreeError(
            f"the tree draws the top-{tree.top_k} candidates of each head, but these heads score "
            f"{model.heads.head_vocab_size} tokens: use a tree whose ranks are below {model.heads.head_vocab_size}"
        )
    return tree


def prefill(
    model: MedusaModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    depth: int,
    rule: AcceptanceRule,
) -> DecodeState:
    """Run the (padded) prompts; each row's root comes from `rule.first_token`, the heads' logits at its last token.

    Only the first `depth` heads run (the tree's depth): deeper heads would cost a vocab projection each for
    candidates the tree never uses.
    """
    batch, length = input_ids.shape
    cache = DynamicCache(config=model.base.config)
    if attention_mask is None:
        positions = torch.arange(length, device=input_ids.device)[None].expand(batch, -1)
        last = torch.full((batch,), length - 1, device=input_ids.device)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        last = length - 1 - attention_mask.long().flip(-1).argmax(-1)  # last valid position per row
    out = model.base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
    )
    hidden = out.last_hidden_state[torch.arange(batch, device=input_ids.device), last]  # [B, H]
    roots = rule.first_token(model.base_logits(hidden))
    return DecodeState(RowCache.from_prefill(cache, attention_mask, length), roots, model.heads_fn(hidden, depth))


def propose(roots: torch.Tensor, medusa_logits: torch.Tensor, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
    """The tree's tokens [B, N]: each row's root, then each node's head candidate (depth d uses head d-1, rank = last
    rank). roots [B]; medusa_logits [depth, B, V]."""
    if tree.depth == 0:
        return roots[:, None]
    topk = medusa_logits[: tree.depth].topk(tree.top_k, dim=-1).indices  # [depth, B, top_k]
    candidates = topk.movedim(0, 1).flatten(1)  # [B, depth * top_k], head-major like tree_indices
    return torch.cat([roots[:, None], candidates], dim=-1)[:, buffers.tree_indices]


def verify_tree(
    model: MedusaModel, tree_tokens: torch.Tensor, buffers: TreeBuffers, cache: RowCache, attn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE base forward over every row's tree tokens at positions lens[b] + depth; base logits [B, N, V] and last
    hidden states [B, N, H]. The heads run later, on the one node that ends each accepted path."""
    lens = cache.lens
    positions = lens[:, None] + buffers.position_offsets[None]
    inputs = attn_inputs(attn, buffers, lens, model.dtype)
    cache.begin_forward(tree_tokens.shape[1])
    return model.step_fn(tree_tokens, positions, cache, **inputs)


def accepted_run(ok: torch.Tensor, buffers: TreeBuffers) -> torch.Tensor:
    """Per root-to-leaf path [..., L]: how many candidates in a row, from the root down, a rule accepted.

    ok [..., L, D]: whether the candidate at depth d + 1 of path l is accepted after its parent (padding ignored).
    """
    depth = buffers.retrieve_indices.shape[1] - 1
    real = torch.arange(depth, device=ok.device)[None] < (buffers.path_lengths - 1)[:, None]  # [L, D]
    return (ok & real).int().cumprod(dim=-1).sum(dim=-1)


def path_accept_counts(tree_tokens: torch.Tensor, predictions: torch.Tensor, buffers: TreeBuffers) -> torch.Tensor:
    """Per root-to-leaf path [..., L]: how many candidates in a row equal the base's argmax after their parent.

    tree_tokens and predictions (the base's argmax after each node) are [N], or [B, N] for a batch.
    """
    retrieve = buffers.retrieve_indices
    candidates = tree_tokens[..., retrieve]  # [..., L, D + 1]
    predicted = predictions[..., retrieve]
    return accepted_run(candidates[..., 1:] == predicted[..., :-1], buffers)


def accept_greedy(tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> Acceptance:
    """Per row, the root-to-leaf path with the longest run of candidates equal to the base's argmax after their
    parent; the next root is the argmax after its last node."""
    predictions = logits.argmax(-1)  # [B, N]: the base's next token after each node
    accepted = path_accept_counts(tree_tokens, predictions, buffers)  # [B, L]
    best = accepted.argmax(-1)
    nodes = buffers.retrieve_indices[best]  # [B, D + 1]
    counts = accepted.gather(1, best[:, None])[:, 0] + 1
    last = nodes.gather(1, (counts - 1)[:, None])[:, 0]
    return Acceptance(nodes, counts, predictions.gather(1, last[:, None])[:, 0])


class Greedy:
    """The greedy rule: top-k candidates, exact-match acceptance, argmax roots."""

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def propose(self, state: DecodeState, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
        return propose(state.roots, state.medusa_logits, tree, buffers)

    def accept(self, tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> Acceptance:
        return accept_greedy(tree_tokens, logits, buffers)  # looked up at call time: tests spy on it


def commit(cache: RowCache, nodes: torch.Tensor, counts: torch.Tensor) -> None:
    """Keep row b's accepted nodes nodes[b, :counts[b]] right after its prefix; everything else is forgotten."""
    cache.keep_nodes(nodes, counts)


def decode_step(
    model: MedusaModel, state: DecodeState, tree: MedusaTree, buffers: TreeBuffers, attn: str, rule: AcceptanceRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """propose -> verify -> accept -> commit for every row; advances `state` and returns the emitted tokens [B, D + 1]
    (row b: its counts[b] - 1 accepted candidates, then the next root, left-aligned) and counts [B]."""
    tree_tokens = rule.propose(state, tree, buffers)
    logits, hidden = verify_tree(model, tree_tokens, buffers, state.cache, attn)
    acc = rule.accept(tree_tokens, logits, buffers)
    commit(state.cache, acc.nodes, acc.counts)
    rows = torch.arange(tree_tokens.shape[0], device=tree_tokens.device)
    last = acc.nodes.gather(1, (acc.counts - 1)[:, None])[:, 0]  # the node that ends each row's accepted path
    state.roots = acc.next_roots
    state.medusa_logits = model.heads_fn(hidden[rows, last], tree.depth)
    candidates = tree_tokens.gather(1, acc.nodes[:, 1:])  # [B, D]
    emitted = torch.cat([candidates, acc.next_roots[:, None]], 1)
    # Left-align: the next root goes right after each row's accepted candidates.
    emitted.scatter_(1, (acc.counts - 1)[:, None], acc.next_roots[:, None])
    return emitted, acc.counts


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def _truncate(tokens: list[int], eos: set[int], budget: int) -> tuple[list[int], bool]:
    """Cut emitted tokens at the first EOS (kept, as generate() keeps it) or at the token budget."""
    tokens = tokens[:budget]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


def _registered(attn: str, device: torch.device, plain: bool = False) -> str:
    """The name transformers knows an implementation by (registering ours on first use). On CPU `sdpa` becomes the
    same SDPA with grouped-query heads kept inside it under tree masks (medusa_toolkit.decoding.cpu_attention), unless `plain`."""
    if attn == "medusa_flash_decoding":
        from medusa_toolkit.kernels.hf_attention import register_attention

        return register_attention()
    if attn == "sdpa" and device.type == "cpu" and not plain:
        return register_cpu_sdpa()
    return attn


def _user_facing(registered: str | None) -> str:
    if registered is None or registered == CPU_SDPA_NAME:
        return "sdpa"
    return "medusa_flash_decoding" if registered.startswith("medusa_") else registered


class use_attention:
    """Context manager: run the base model with a given attention implementation (None: the model's current one),
    then restore the previous one. `plain=True` keeps transformers' own `sdpa` on CPU (the reference decoder)."""

    def __init__(self, model: MedusaModel, attn: str | None, plain: bool = False):
        self.model, self.attn, self.plain, self.previous = model, attn, plain, None

    def __enter__(self) -> str:
        current = self.model.base.config._attn_implementation
        wanted = _user_facing(current) if self.attn is None else self.attn
        if wanted not in ATTN_IMPLEMENTATIONS:
            if self.attn is None:
                return wanted  # an implementation the user loaded the base with (e.g. flex_attention): left alone
            raise ValueError(f"attn_implementation {wanted!r} is unknown; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        target = _registered(wanted, self.model.device, self.plain)
        if target != (current or "sdpa"):
            self.previous = current or "sdpa"
            self.model.base.set_attn_implementation(target)
        return wanted

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            self.model.base.set_attn_implementation(self.previous)


@dataclass
class Decoded:
    """What `decode` produced per row: new tokens, tokens per step; and the batch's timings."""

    new_tokens: list[list[int]]
    accept_lengths: list[list[int]]
    wall_time: float
    prefill_time: float
    forwards: int


@torch.inference_mode()
def decode(
    model: MedusaModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    tree: MedusaTree,
    eos: set[int],
    attn: str,
    rule: AcceptanceRule,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> Decoded:
    """The one decoding loop: prefill, then `decode_step` until every row hit EOS or max_new_tokens.

    Finished rows leave the batch (their cache rows are dropped), so they stop costing compute. `on_tokens(row,
    tokens)` sees every row's tokens as they are emitted (a streamer).
    """
    device = model.device
    buffers = tree.buffers(device)
    batch = input_ids.shape[0]
    new: list[list[int]] = [[] for _ in range(batch)]
    accept_lengths: list[list[int]] = [[] for _ in range(batch)]
    forwards = 0
    start = time.perf_counter()
    state = prefill(model, input_ids, attention_mask, tree.depth, rule)
    prefill_time = time.perf_counter() - start

    def emit(row: int, tokens: list[int], step: bool) -> bool:
        """Record a row's tokens; True while the row goes on."""
        kept, done = _truncate(tokens, eos, max_new_tokens - len(new[row]))
        new[row] += kept
        if step:
            accept_lengths[row].append(len(kept))
        if on_tokens is not None:
            on_tokens(row, kept)
        return not done and len(new[row]) < max_new_tokens

    active = [b for b, root in enumerate(state.roots.tolist()) if emit(b, [root], step=False)]
    _keep_rows(state, active, list(range(batch)))
    while active:
        emitted, counts = decode_step(model, state, tree, buffers, attn, rule)
        forwards += 1
        still = [b for b, row, n in zip(active, emitted.tolist(), counts.tolist()) if emit(b, row[:n], step=True)]
        _keep_rows(state, still, active)
        active = still
    return Decoded(new, accept_lengths, time.perf_counter() - start, prefill_time, forwards)


def _keep_rows(state: DecodeState, keep: list[int], current: list[int]) -> None:
    """Drop finished rows from the batch (cache, roots, heads' logits)."""
    if len(keep) == len(current) or not keep:
        return
    position = {b: i for i, b in enumerate(current)}
    rows = torch.tensor([position[b] for b in keep], device=state.roots.device)
    state.cache.keep_rows(rows)
    state.roots, state.medusa_logits = state.roots[rows], state.medusa_logits[:, rows]


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@torch.inference_mode()
def medusa_generate(
    model: MedusaModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    tree: MedusaTree | str | list | None = None,
    eos_token_id: int | list[int] | None = None,
    streamer: Any = None,
    attn_implementation: str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> MedusaGenerateOutput:
    """Greedy Medusa decoding of ONE prompt, token-identical to `model.base.generate(do_sample=False, ...)`.

    Every prompt token is attended to, as `generate(input_ids, attention_mask=ones)` does. (Without a mask,
    generate() treats prompt tokens equal to the pad id as padding; chat models whose pad id is their end-of-turn
    token, like SmolLM2, then decode a different text.) A padded single prompt may pass its `attention_mask`.

    `tree`: a MedusaTree, a preset name (`chain-N`, `mc_sim_7b_63`), a tree.json path, a list of paths, or None
    (a chain over all heads). `eos_token_id`: an id or a list; None uses the model's generation config (as
    `generate()` does when it is not given); `[]` never stops early. `streamer`: a transformers streamer; it gets the
    prompt, then tokens as they are accepted. `attn_implementation`: sdpa | eager | medusa_flash_decoding (default:
    the model's current one). For several prompts at once use `medusa_generate_batch`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"medusa_generate decodes one prompt (a streamer takes one sequence), got a batch of {input_ids.shape[0]}; "
            "use medusa_generate_batch(model, input_ids, attention_mask, ...) for a batch"
        )
    if attention_mask is not None:
        input_ids = input_ids[:, attention_mask[0].bool()]  # one prompt: its padding is just dropped
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: medusa_generate needs at least one input token")
    _check_max_new_tokens(max_new_tokens)
    tree = resolve_tree(tree, model)
    input_ids = input_ids.to(model.device)
    on_tokens = None
    if streamer is not None:
        streamer.put(input_ids.cpu())

        def on_tokens(row: int, tokens: list[int]) -> None:
            if tokens:
                streamer.put(torch.tensor(tokens))

    with use_attention(model, attn_implementation) as attn:
        out = decode(
            model,
            input_ids,
            None,
            max_new_tokens,
            tree,
            set(special_tokens.eos_ids(model, eos_token_id)),
            attn,
            Greedy(),
            on_tokens,
        )
    if streamer is not None:
        streamer.end()
    tokens = torch.tensor(out.new_tokens[0], dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids[0], tokens])[None]
    return MedusaGenerateOutput(sequences, out.accept_lengths[0], tokens.numel(), out.wall_time, out.prefill_time)


@torch.inference_mode()
def medusa_generate_batch(
    model: MedusaModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    tree: MedusaTree | str | list | None = None,
    eos_token_id: int | list[int] | None = None,
    attn_implementation: str | None = None,
    pad_token_id: int | None = None,
) -> BatchGenerateOutput:
    """Greedy Medusa decoding of a padded batch; row b equals greedy decoding of prompt b alone.

    `attention_mask` [B, L] marks real tokens (1) and padding (0), left or right; None means no padding.
    `pad_token_id` pads the returned sequences (default: medusa_toolkit.special_tokens.pad_token_id).
    Other arguments as in `medusa_generate`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and (attention_mask.sum(1) == 0).any():
        empty = int((attention_mask.sum(1) == 0).nonzero()[0])
        raise ValueError(f"prompt {empty} is empty (its attention_mask is all 0): every row needs >= 1 real token")
    _check_max_new_tokens(max_new_tokens)
    tree = resolve_tree(tree, model)
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device).long()
        if bool(attention_mask.bool().all()):
            attention_mask = None  # no padding: the plain causal prefill, as for one prompt
    prompts = [
        input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        for b in range(len(input_ids))
    ]
    pad = pad_token_id if pad_token_id is not None else special_tokens.pad_token_id(model)
    with use_attention(model, attn_implementation) as attn:
        out = decode(
            model,
            input_ids,
            attention_mask,
            max_new_tokens,
            tree,
            set(special_tokens.eos_ids(model, eos_token_id)),
            attn,
            Greedy(),
        )
    rows = [
        torch.cat([p, torch.tensor(n, dtype=input_ids.dtype, device=device)]) for p, n in zip(prompts, out.new_tokens)
    ]
    lengths = torch.tensor([r.numel() for r in rows])
    sequences = torch.full((len(rows), int(lengths.max())), pad, dtype=input_ids.dtype, device=device)
    for b, r in enumerate(rows):
        sequences[b, : r.numel()] = r
    return BatchGenerateOutput(
        sequences, lengths, out.accept_lengths, [len(n) for n in out.new_tokens], [p.numel() for p in prompts], pad,
        out.wall_time, out.prefill_time, out.forwards,
    )  # fmt: skip


@torch.inference_mode()
def greedy_generate_batch(
    base: torch.nn.Module | MedusaModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    attn_implementation: str | None = None,
) -> list[list[int]]:
    """The base's own greedy continuation of each row of a padded batch: new tokens, EOS kept where a row ends.

    The same tokens as `base.generate(input_ids, attention_mask, do_sample=False)` row for row: `medusa_generate_batch`
    with no heads and the 1-node tree. On 2 CPU cores that is 1.18x generate()'s speed at batch 32 and 1.30x at 64
    (benchmarks/bench_data_throughput.py): every layer writes its keys in place instead of concatenating the whole
    cache each step, and finished rows leave the batch instead of running to the longest row's end. `base` may be a
    MedusaModel already set up for decoding (e.g. compiled), which is then used as it is.
    """
    model = base if isinstance(base, MedusaModel) else MedusaModel(base, None)
    out = medusa_generate_batch(
        model, input_ids, attention_mask, max_new_tokens, MedusaTree.chain(0), eos_token_id, attn_implementation
    )  # fmt: skip
    return [out.sequences[b, out.prompt_lengths[b] : out.lengths[b]].tolist() for b in range(len(out.lengths))]
