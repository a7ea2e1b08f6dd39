"""Exact greedy Medusa decoding for a batch of prompts of different lengths.

Same step as `medusa_toolkit.decoding` (propose -> verify -> accept -> commit), run for B rows at once, with two
differences that make batching work without re-padding every step:

- A row-wise KV cache (`RowCache`): every row keeps its own valid length `lens[b]`. The prompt's valid tokens are
  compacted to the left after prefill (left or right padding both work), a step writes row b's N tree tokens at
  `lens[b] .. lens[b] + N`, and committing moves row b's accepted nodes right after its prefix and bumps `lens[b]`
  by however many tokens *that row* accepted. Keys past `lens[b]` are stale and masked out: by `medusa_kv_lens` for
  the medusa_flash_decoding kernel, by a dense per-row 4D additive mask for sdpa/eager. Position ids are per row.
- Rows that finish (EOS or token budget) are dropped from the batch, so they stop costing compute.

Every row's tokens are the base's argmax given exactly that row's previous tokens, so each row equals that prompt's
own greedy decoding (up to floating-point differences between batched and unbatched matmuls, which do not flip an
argmax in fp32 in practice; the tests check token ids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from medusa_toolkit.decoding import _eos_ids, _truncate, path_accept_counts, propose, use_attention
from medusa_toolkit.medusa_model import MedusaModel
from medusa_toolkit.tree import MedusaTree, TreeBuffers

GROW = 256  # cache slots added at a time when a row outgrows the buffer (amortises the copy)


@dataclass
class BatchGenerateOutput:
    """sequences: [B, L] each row's prompt (padding removed) + new tokens, right-padded with `pad_token_id`.

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
# Row-wise KV cache


@dataclass
class _RowState:
    """Shared by all layers of a RowCache; set once per forward by the decoding loop."""

    lens: torch.Tensor  # [B] long: valid cached tokens per row (the forward's new tokens not included)
    max_len: int  # max(lens), kept on the host so layers never sync
    write_index: torch.Tensor | None = None  # [B, T]: where this forward's T new tokens go in each row


class RowLayer(DynamicLayer):
    """One layer's K/V [B, Hkv, capacity, D] written per row at `lens[b] + t`, returned up to `max(lens) + T`."""

    def __init__(self, state: _RowState, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.state, self.keys, self.values = state, keys, values
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        s = self.state
        need = s.max_len + key_states.shape[-2]
        if self.keys.shape[-2] < need:  # zeros, not garbage: masked keys must still be finite (0 * NaN = NaN)
            pad = self.keys.new_zeros(*self.keys.shape[:2], max(GROW, need - self.keys.shape[-2]), self.keys.shape[-1])
            self.keys, self.values = torch.cat([self.keys, pad], 2), torch.cat([self.values, pad], 2)
        index = s.write_index[:, None, :, None].expand_as(key_states)
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys[:, :, :need], self.values[:, :, :need]

    def get_seq_length(self) -> int:
        return self.state.max_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.max_len + query_length, 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]


class RowCache(Cache):
    """A KV cache with a valid length per row (see the module docstring)."""

    def __init__(self, layers: list[RowLayer], state: _RowState):
        super().__init__(layers=layers)
        self.state = state

    @classmethod
    def from_prefill(cls, cache: DynamicCache, attention_mask: torch.Tensor) -> RowCache:
        """Compact a padded prefill cache: row b's valid keys move to 0..lens[b]-1, the rest is zeroed."""
        valid = attention_mask.bool()
        lens = valid.sum(1)
        order = torch.sort((~valid).int(), dim=1, stable=True).indices  # valid positions first, in order
        keep = (torch.arange(valid.shape[1], device=valid.device)[None] < lens[:, None])[:, None, :, None]
        state = _RowState(lens=lens, max_len=int(lens.max()))
        layers = []
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"batched Medusa decoding needs plain dynamic KV cache layers, got {type(layer).__name__} "
                    "(sliding-window models are not supported with batch > 1)"
                )
            index = order[:, None, :, None].expand_as(layer.keys)
            k = torch.where(keep, layer.keys.gather(2, index), 0.0)
            v = torch.where(keep, layer.values.gather(2, index), 0.0)
            layers.append(RowLayer(state, k, v))
        return cls(layers, state)

    def begin_forward(self, num_new: int) -> None:
        """Before a forward of `num_new` tokens per row: where each row writes them."""
        s = self.state
        s.write_index = s.lens[:, None] + torch.arange(num_new, device=s.lens.device)[None]

    def keep_nodes(self, kept: torch.Tensor, counts: torch.Tensor) -> None:
        """Commit a step: row b keeps tree nodes kept[b, :counts[b]] right after its prefix."""
        s = self.state
        src = s.lens[:, None] + kept  # [B, D + 1]; entries past counts[b] are harmless junk beyond the new length
        dst = s.lens[:, None] + torch.arange(kept.shape[1], device=kept.device)[None]
        for layer in self.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                shape = (t.shape[0], t.shape[1], kept.shape[1], t.shape[3])
                moved = t.gather(2, src[:, None, :, None].expand(shape))
                t.scatter_(2, dst[:, None, :, None].expand(shape), moved)
        s.lens = s.lens + counts
        s.max_len = int(s.lens.max())

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows from the batch."""
        for layer in self.layers:
            layer.keep_rows(rows)
        self.state.lens = self.state.lens[rows]
        self.state.max_len = int(self.state.lens.max())


# ----------------------------------------------------------------------------------------------------------------------
# The pieces


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


def prefill_batch(
    model: MedusaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[RowCache, torch.Tensor, torch.Tensor]:
    """Run the padded prompts; return the row cache, roots [B] and the heads' logits [num_heads, B, V]."""
    cache = DynamicCache(config=model.base.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
    )
    last = attention_mask.shape[1] - 1 - attention_mask.long().flip(-1).argmax(-1)  # last valid position per row
    hidden = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # [B, H]
    roots = model.base_logits(hidden).argmax(-1)
    return RowCache.from_prefill(cache, attention_mask), roots, model.medusa_logits(hidden)


def accept_greedy_batch(tree_tokens: torch.Tensor, logits: torch.Tensor, buffers: TreeBuffers):
    """Per row: accepted path nodes [B, D + 1] (valid up to counts[b]), counts [B] and the base's argmax [B, N]."""
    predictions = logits.argmax(-1)  # [B, N]
    accepted = path_accept_counts(tree_tokens, predictions, buffers)  # [B, L]
    best = accepted.argmax(-1)
    return buffers.retrieve_indices[best], accepted.gather(1, best[:, None])[:, 0] + 1, predictions


# ----------------------------------------------------------------------------------------------------------------------
# The loop


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
    `pad_token_id` pads the returned sequences (default: the model's pad id, else its first EOS id, else 0).
    Other arguments as in `medusa_generate`.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    if (attention_mask.sum(1) == 0).any():
        empty = int((attention_mask.sum(1) == 0).nonzero()[0])
        raise ValueError(f"prompt {empty} is empty (its attention_mask is all 0): every row needs >= 1 real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tree = MedusaTree.resolve(tree, model.num_heads)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    buffers = tree.buffers(device)
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.base.generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    batch, n_nodes = input_ids.shape[0], buffers.attn_mask.shape[0]
    prompts = [input_ids[b][attention_mask[b].bool()] for b in range(batch)]
    pieces: list[list[torch.Tensor]] = [[p] for p in prompts]
    accept_lengths: list[list[int]] = [[] for _ in range(batch)]
    produced, forwards = [0] * batch, 0

    with use_attention(model, attn_implementation) as attn:
        start = time.perf_counter()
        cache, roots, medusa_logits = prefill_batch(model, input_ids, attention_mask)
        prefill_time = time.perf_counter() - start

        active: list[int] = []  # original row index of each row still in the batch
        for b in range(batch):
            emitted, done = _truncate(roots[b : b + 1], eos, max_new_tokens)
            pieces[b].append(emitted)
            produced[b] = emitted.numel()
            if not done and produced[b] < max_new_tokens:
                active.append(b)
        if len(active) < batch:
            keep = torch.tensor(active, device=device, dtype=torch.long)
            cache.keep_rows(keep)
            roots, medusa_logits = roots[keep], medusa_logits[:, keep]

        while active:
            tree_tokens = propose(roots[:, None], medusa_logits, tree, buffers)  # [B, N]
            lens = cache.state.lens
            positions = lens[:, None] + buffers.position_offsets[None]
            if attn == "medusa_flash_decoding":
                kw = {"attention_mask": None, "medusa_tree_mask": buffers.attn_mask, "medusa_kv_lens": lens + n_nodes}
            else:
                kw = {"attention_mask": row_tree_mask(buffers, lens, model.dtype)}
            cache.begin_forward(n_nodes)
            out = model(tree_tokens, position_ids=positions, cache=cache, with_medusa=False, **kw)
            forwards += 1
            nodes, counts, predictions = accept_greedy_batch(tree_tokens, out.logits, buffers)
            cache.keep_nodes(nodes, counts)

            rows = torch.arange(len(active), device=device)
            last = nodes.gather(1, (counts - 1)[:, None])[:, 0]  # the node that ends each row's accepted path
            roots = predictions[rows, last]
            medusa_logits = model.medusa_logits(out.hidden_states[rows, last])  # [num_heads, B, V]
            emitted_rows = torch.cat([tree_tokens.gather(1, nodes[:, 1:]), roots[:, None]], 1).tolist()
            still = []
            for i, (b, n) in enumerate(zip(active, counts.tolist())):
                row = emitted_rows[i][: n - 1] + emitted_rows[i][-1:]  # accepted candidates, then the new root
                emitted, done = _truncate(torch.tensor(row, dtype=input_ids.dtype), eos, max_new_tokens - produced[b])
                pieces[b].append(emitted.to(device))
                accept_lengths[b].append(emitted.numel())
                produced[b] += emitted.numel()
                if not done and produced[b] < max_new_tokens:
                    still.append(i)
            if len(still) < len(active):  # finished rows leave the batch
                keep = torch.tensor(still, device=device, dtype=torch.long)
                active = [active[i] for i in still]
                if active:
                    cache.keep_rows(keep)
                    roots, medusa_logits = roots[keep], medusa_logits[:, keep]
        wall = time.perf_counter() - start

    rows_out = [torch.cat(p) for p in pieces]
    lengths = torch.tensor([r.numel() for r in rows_out])
    sequences = torch.full((batch, int(lengths.max())), pad_token_id, dtype=input_ids.dtype, device=device)
    for b, r in enumerate(rows_out):
        sequences[b, : r.numel()] = r
    return BatchGenerateOutput(
        sequences, lengths, accept_lengths, produced, [p.numel() for p in prompts],
        pad_token_id, wall, prefill_time, forwards,
    )  # fmt: skip
