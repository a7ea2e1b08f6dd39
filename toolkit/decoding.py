"""Exact Medusa greedy decoding, in plain functions.

One step, after a prefill has produced the base model's next token (the *root*) and the heads' guesses:
  1. propose:  the heads' top-k candidates, arranged as the tree's nodes  -> tree tokens [N]
  2. verify:   ONE base forward over all N tree tokens with the tree mask and depth-based positions
  3. accept:   the longest root-to-leaf path whose every token equals the base model's argmax after its parent
  4. commit:   emit the accepted tokens plus the base's argmax after the last accepted one (the next root), and keep
               only the accepted positions in the KV cache.
Every emitted token is an argmax of the base model given exactly the tokens before it, so the output equals plain
greedy decoding token for token; the heads only decide how many tokens one forward yields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from medusa_toolkit.medusa_model import MedusaModel
from medusa_toolkit.tree import MedusaTree, TreeBuffers

# User-facing names. "medusa_flash_decoding" is registered with transformers under the kernel package's ATTN_NAME,
# which avoids the substring "flash" (transformers routes any such name to its FlashAttention code paths).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "medusa_flash_decoding")


@dataclass
class MedusaGenerateOutput:
    """sequences: prompt + new tokens [1, L]. accept_lengths[i]: tokens emitted by verification step i (>= 1)."""

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
class StepResult:
    """What one verification step decided: accepted node indices (root first) and the tokens it emits."""

    accepted_nodes: torch.Tensor  # [n + 1] node indices, root first
    emitted: torch.Tensor  # [n + 1] the n accepted candidates, then the next root


# ----------------------------------------------------------------------------------------------------------------------
# The pieces


def tree_attention_mask(buffers: TreeBuffers, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense 4D additive mask [1, 1, N, prefix_len + N]: every node sees the whole prefix, then its tree ancestors."""
    n = buffers.attn_mask.shape[0]
    allowed = torch.ones(n, prefix_len + n, dtype=torch.bool, device=buffers.attn_mask.device)
    allowed[:, prefix_len:] = buffers.attn_mask
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def attn_inputs(attn: str, buffers: TreeBuffers, prefix_len: int, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments that carry the tree mask to the attention: dense for sdpa/eager, compact for the kernel."""
    if attn == "medusa_flash_decoding":
        return {"attention_mask": None, "medusa_tree_mask": buffers.attn_mask}
    return {"attention_mask": tree_attention_mask(buffers, prefix_len, dtype)}


def prefill(
    model: MedusaModel, input_ids: torch.Tensor, cache: Any, num_heads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt; return the root (the base's greedy next token, [1]) and the heads' logits [num_heads, V].

    Only the first `num_heads` heads run (the tree's depth): deeper heads would cost a vocab projection each for
    candidates the tree never uses.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    out = model(input_ids, position_ids=positions, cache=cache, logits_to_keep=1, with_medusa=False)
    hidden = out.hidden_states[0, -1]
    return out.logits[0, -1].argmax(-1, keepdim=True), model.medusa_logits(hidden, num_heads)


def propose(root: torch.Tensor, medusa_logits: torch.Tensor, tree: MedusaTree, buffers: TreeBuffers) -> torch.Tensor:
    """The tree's tokens [..., N]: the root, then each node's head candidate (depth d uses head d-1, rank = last rank).

    root: [1] and medusa_logits [num_heads, V] for one sequence; [B, 1] and [num_heads, B, V] for a batch.
    """
    depth = tree.depth
    if depth == 0:
        return root
    topk = medusa_logits[:depth].topk(tree.top_k, dim=-1).indices  # [depth, (B,) top_k]
    candidates = topk.movedim(0, -2).flatten(-2)  # [(B,) depth * top_k], head-major like tree_indices
    return torch.cat([root, candidates], dim=-1)[..., buffers.tree_indices]


def verify(
    model: MedusaModel, tree_tokens: torch.Tensor, prefix_len: int, buffers: TreeBuffers, cache: Any, attn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One base forward over the tree tokens; return base logits [N, V] and last hidden states [N, H].

    The heads run later, on the one node that ends the accepted path.
    """
    positions = (prefix_len + buffers.position_offsets)[None]
    inputs = attn_inputs(attn, buffers, prefix_len, model.dtype)
    out = model(tree_tokens[None], position_ids=positions, cache=cache, with_medusa=False, **inputs)
    return out.logits[0], out.hidden_states[0]


def path_accept_counts(tree_tokens: torch.Tensor, predictions: torch.Tensor, buffers: TreeBuffers) -> torch.Tensor:
    """Per root-to-leaf path [..., L]: how many candidates in a row equal the base's argmax after their parent.

    tree_tokens and predictions (the base's argmax after each node) are [N], or [B, N] for a batch.
    """
    retrieve = buffers.retrieve_indices
    candidates = tree_tokens[..., retrieve]  # [..., L, D + 1]
    predicted = predictions[..., retrieve]
    depth = retrieve.shape[1] - 1
    real = torch.arange(depth, device=retrieve.device)[None] < (buffers.path_lengths - 1)[:, None]  # [L, D]
    matches = (candidates[..., 1:] == predicted[..., :-1]) & real
    return matches.int().cumprod(dim=-1).sum(dim=-1)


def accept_greedy(tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers) -> StepResult:
    """Pick the root-to-leaf path with the longest run of candidates equal to the base's argmax after their parent."""
    predictions = logits.argmax(-1)  # [N] the base's next token after each node
    accepted = path_accept_counts(tree_tokens, predictions, buffers)  # [L] candidates accepted on each path
    best = int(accepted.argmax())
    n = int(accepted[best])
    nodes = buffers.retrieve_indices[best, : n + 1]
    emitted = torch.cat([tree_tokens[nodes[1:]], predictions[nodes[-1:]]])
    return StepResult(nodes, emitted)


def keep_cache_positions(cache: Any, prefix_len: int, kept_nodes: torch.Tensor) -> None:
    """Drop the rejected tree positions: move the kept nodes' K/V right after the prefix and cut the rest."""
    index = prefix_len + kept_nodes
    new_len = prefix_len + kept_nodes.numel()
    for layer in cache.layers:
        if not hasattr(layer, "keys") or getattr(layer, "is_sliding", False):
            raise NotImplementedError(f"Medusa decoding needs a plain dynamic KV cache, got {type(layer).__name__}")
        # Advanced indexing copies first, so the overlapping in-place write is safe.
        layer.keys[..., prefix_len:new_len, :] = layer.keys[..., index, :]
        layer.values[..., prefix_len:new_len, :] = layer.values[..., index, :]
        layer.keys = layer.keys[..., :new_len, :]
        layer.values = layer.values[..., :new_len, :]


def _eos_ids(model: MedusaModel, eos_token_id: int | list[int] | None) -> set[int]:
    if eos_token_id is None:  # like generate(): fall back to the model's generation config
        eos_token_id = getattr(model.base.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)}


def _truncate(tokens: torch.Tensor, eos: set[int], budget: int) -> tuple[torch.Tensor, bool]:
    """Cut emitted tokens at the first EOS (kept, as generate() keeps it) or at the token budget."""
    tokens = tokens[:budget]
    for i, t in enumerate(tokens.tolist()):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


def _registered(attn: str) -> str:
    """The name transformers knows an implementation by (registering our kernel on first use)."""
    if attn == "medusa_flash_decoding":
        from medusa_toolkit.kernels import register_attention

        return register_attention()
    return attn


def _user_facing(registered: str) -> str:
    return (
        "sdpa" if registered is None else ("medusa_flash_decoding" if registered.startswith("medusa_") else registered)
    )


class use_attention:
    """Context manager: run the base model with a given attention implementation, then restore the previous one."""

    def __init__(self, model: MedusaModel, attn: str | None):
        self.model, self.attn, self.previous = model, attn, None

    def __enter__(self) -> str:
        current = _user_facing(self.model.base.config._attn_implementation)
        if self.attn is None or self.attn == current:
            return current
        if self.attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation {self.attn!r} is unknown; use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        self.previous = self.model.base.config._attn_implementation
        self.model.base.set_attn_implementation(_registered(self.attn))
        return self.attn

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            self.model.base.set_attn_implementation(self.previous)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


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
    """Greedy Medusa decoding, token-identical to `model.base.generate(do_sample=False, max_new_tokens=...)`.

    Every prompt token is attended to, as `generate(input_ids, attention_mask=ones)` does. (Without a mask,
    generate() treats prompt tokens equal to the pad id as padding; chat models whose pad id is their end-of-turn
    token, like SmolLM2, then decode a different text.)

    `tree`: a MedusaTree, a preset name (`chain-N`, `mc_sim_7b_63`), a tree.json path, a list of paths, or None
    (a chain over all heads). `eos_token_id`: an id or a list; None uses the model's generation config (as
    `generate()` does when it is not given); `[]` never stops early. `streamer`: a transformers streamer; it gets the prompt, then tokens as they are
    accepted. `attn_implementation`: sdpa | eager | medusa_flash_decoding (default: the model's current one).

    Batch > 1: pass padded `input_ids` [B, L] and `attention_mask` [B, L] (left or right padding); the result is
    `medusa_toolkit.batched.BatchGenerateOutput` (`.sequences` right-padded, `.lengths`, per-row `.accept_lengths`).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.bool().all())):
        if streamer is not None:
            raise ValueError("a streamer takes one sequence: stream batch-1 calls, or pass streamer=None for a batch")
        from medusa_toolkit.batched import medusa_generate_batch

        return medusa_generate_batch(
            model, input_ids, attention_mask, max_new_tokens, tree, eos_token_id, attn_implementation
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: medusa_generate needs at least one input token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tree = MedusaTree.resolve(tree, model.num_heads)
    device = model.device
    input_ids = input_ids.to(device)
    buffers = tree.buffers(device)
    eos = _eos_ids(model, eos_token_id)

    with use_attention(model, attn_implementation) as attn:
        start = time.perf_counter()
        cache = DynamicCache(config=model.base.config)
        root, medusa_logits = prefill(model, input_ids, cache, tree.depth)
        prefill_time = time.perf_counter() - start
        if streamer is not None:
            streamer.put(input_ids.cpu())

        new_tokens, done = _truncate(root, eos, max_new_tokens)
        if streamer is not None:
            streamer.put(new_tokens.cpu())
        accept_lengths: list[int] = []
        pieces = [input_ids[0], new_tokens]
        produced = new_tokens.numel()
        prefix_len = input_ids.shape[1]  # tokens whose K/V are in the cache; the root is not yet

        while not done and produced < max_new_tokens:
            tree_tokens = propose(root, medusa_logits, tree, buffers)
            logits, hidden = verify(model, tree_tokens, prefix_len, buffers, cache, attn)
            step = accept_greedy(tree_tokens, logits, buffers)
            keep_cache_positions(cache, prefix_len, step.accepted_nodes)
            prefix_len += step.accepted_nodes.numel()

            emitted, done = _truncate(step.emitted, eos, max_new_tokens - produced)
            accept_lengths.append(emitted.numel())
            pieces.append(emitted)
            produced += emitted.numel()
            if streamer is not None:
                streamer.put(emitted.cpu())
            root, medusa_logits = step.emitted[-1:], model.medusa_logits(hidden[step.accepted_nodes[-1]], tree.depth)

        if streamer is not None:
            streamer.end()
        wall = time.perf_counter() - start

    sequences = torch.cat(pieces)[None]
    return MedusaGenerateOutput(sequences, accept_lengths, produced, wall, prefill_time)
