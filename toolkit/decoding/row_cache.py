"""A KV cache with one valid length per row, so rows of a batch can accept different numbers of tree tokens.

Medusa decoding (medusa_toolkit.decoding.generate) keeps every sequence in one `RowCache`, batch of one included:

- Prefill's padded cache is compacted: row b's valid keys move to 0 .. lens[b] - 1 (left or right padding both work).
- A verification forward of N tree tokens writes row b's keys at lens[b] .. lens[b] + N (`begin_forward`) and returns
  keys up to max(lens) + N; the attention mask (or the kernel's kv_lens) hides what lies past each row's own length.
- Committing a step moves row b's accepted nodes right after its prefix and bumps lens[b] (`keep_nodes`), so a
  rejected node's K/V is never read again. Finished rows leave the batch (`keep_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

GROW = 256  # cache slots added at a time when a row outgrows the buffer (amortises the copy)


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
    def from_prefill(cls, cache: DynamicCache, attention_mask: torch.Tensor | None, length: int) -> RowCache:
        """Compact a padded prefill cache: row b's valid keys move to 0..lens[b]-1, the rest is zeroed.

        `attention_mask` None means no padding: every row holds `length` valid tokens, kept in place.
        """
        layers_in = list(cache.layers)
        for layer in layers_in:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"Medusa decoding needs plain dynamic KV cache layers, got {type(layer).__name__} "
                    "(sliding-window attention models are not supported)"
                )
        batch = layers_in[0].keys.shape[0]
        if attention_mask is None:
            lens = torch.full((batch,), length, dtype=torch.long, device=layers_in[0].keys.device)
            state = _RowState(lens=lens, max_len=length)
            return cls([RowLayer(state, layer.keys, layer.values) for layer in layers_in], state)
        valid = attention_mask.bool()
        lens = valid.sum(1)
        order = torch.sort((~valid).int(), dim=1, stable=True).indices  # valid positions first, in order
        keep = (torch.arange(valid.shape[1], device=valid.device)[None] < lens[:, None])[:, None, :, None]
        state = _RowState(lens=lens, max_len=int(lens.max()))
        layers = []
        for layer in layers_in:
            index = order[:, None, :, None].expand_as(layer.keys)
            k = torch.where(keep, layer.keys.gather(2, index), 0.0)
            v = torch.where(keep, layer.values.gather(2, index), 0.0)
            layers.append(RowLayer(state, k, v))
        return cls(layers, state)

    @property
    def lens(self) -> torch.Tensor:
        """[B] valid cached tokens per row."""
        return self.state.lens

    def set_lens(self, lens: torch.Tensor) -> None:
        """Forget everything past `lens` (the buffer keeps its size): e.g. back to the prefix between timed steps."""
        self.state.lens = lens.clone()
        self.state.max_len = int(lens.max())

    def begin_forward(self, num_new: int) -> None:
        """Before a forward of `num_new` tokens per row: where each row writes them."""
        s = self.state
        s.write_index = s.lens[:, None] + torch.arange(num_new, device=s.lens.device)[None]

    def keep_nodes(self, kept: torch.Tensor, counts: torch.Tensor) -> None:
        """Commit a step: row b keeps tree nodes kept[b, :counts[b]] right after its prefix."""
        s = self.state
        steps = torch.arange(kept.shape[1], device=kept.device)[None]
        # Nodes already where they belong (the root; a chain's or a tree's first branch accepted from the root down)
        # need no move: skipping saves a gather and a scatter per layer on most steps of a chain.
        in_place = bool(((kept == steps) | (steps >= counts[:, None])).all())
        if not in_place:
            self._move(s.lens[:, None] + kept, s.lens[:, None] + steps)
        s.lens = s.lens + counts
        s.max_len = int(s.lens.max())

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's cached K/V at positions src [B, K] to dst [B, K] (entries past a row's count are junk
        beyond its new length, harmless)."""
        for layer in self.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                shape = (t.shape[0], t.shape[1], src.shape[1], t.shape[3])
                moved = t.gather(2, src[:, None, :, None].expand(shape))
                t.scatter_(2, dst[:, None, :, None].expand(shape), moved)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows from the batch."""
        for layer in self.layers:
            layer.keep_rows(rows)
        self.state.lens = self.state.lens[rows]
        self.state.max_len = int(self.state.lens.max())
