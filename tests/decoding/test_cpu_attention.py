"""CPU tree steps: SDPA keeps grouped-query heads inside it under a tree mask (bit-identical, no repeat_kv copies),
and committing a step moves no K/V when the accepted nodes already sit right after the prefix."""

import pytest
import torch
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from medusa_toolkit import medusa_generate
from medusa_toolkit.decoding import generate
from medusa_toolkit.decoding.cpu_attention import CPU_SDPA_NAME, cpu_sdpa_forward
from medusa_toolkit.decoding.row_cache import RowCache, RowLayer, _RowState
from medusa_toolkit.testing.tiny import BRANCHING, fitted


class Grouped(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("queries", [1, 2, 5])
def test_same_bits_as_transformers_sdpa_under_a_tree_mask(queries):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, queries, 16, generator=g)
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.zeros(2, 1, queries, 40)
    mask[..., -queries:] = torch.triu(torch.full((queries, queries), torch.finfo(torch.float32).min), 1)
    mask[1, ..., :7] = torch.finfo(torch.float32).min  # a padded row
    ours, _ = cpu_sdpa_forward(Grouped(), q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(Grouped(), q, k, v, mask, scaling=0.25)
    assert torch.equal(ours, theirs)


@pytest.fixture
def repeat_kv_calls(monkeypatch):
    calls = []
    original = sdpa_attention.repeat_kv

    def counting(hidden, n_rep):
        calls.append(hidden.shape)
        return original(hidden, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counting)
    return calls


def test_cpu_tree_steps_copy_no_kv_heads_and_stay_exact(repeat_kv_calls):
    model, corpus = fitted("llama")  # 4 query heads over 2 KV heads
    ids = corpus[3:4, :17]
    before = model.base.config._attn_implementation
    out = medusa_generate(model, ids, max_new_tokens=32, tree=BRANCHING, attn_implementation="sdpa")
    assert model.base.config._attn_implementation == before  # restored after decoding
    assert repeat_kv_calls == []
    assert sum(n - 1 for n in out.accept_lengths) > 0  # multi-token tree steps really ran
    reference = model.base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    assert torch.equal(out.sequences, reference)


def test_decoding_switches_to_the_cpu_variant_and_the_reference_does_not():
    model, _ = fitted("llama")
    seen = {}
    with generate.use_attention(model, "sdpa") as name:
        seen["decoding"] = (name, model.base.config._attn_implementation)
    with generate.use_attention(model, "sdpa", plain=True) as name:
        seen["reference"] = (name, model.base.config._attn_implementation)
    assert seen == {"decoding": ("sdpa", CPU_SDPA_NAME), "reference": ("sdpa", "sdpa")}


def _cache(length: int = 6, extra: int = 4) -> RowCache:
    keys = torch.arange(2 * 1 * (length + extra) * 1, dtype=torch.float32).view(2, 1, length + extra, 1)
    state = _RowState(lens=torch.tensor([length, length]), max_len=length)
    return RowCache([RowLayer(state, keys.clone(), keys.clone() + 100)], state)


def test_commit_moves_nothing_when_the_accepted_nodes_are_in_place(monkeypatch):
    cache = _cache()
    moves = []
    monkeypatch.setattr(RowCache, "_move", lambda self, src, dst: moves.append((src, dst)))
    # Row 0 accepted nodes 0, 1, 2 (a chain); row 1 only its root (the rest of its row is junk past counts).
    cache.keep_nodes(torch.tensor([[0, 1, 2], [0, 3, 1]]), torch.tensor([3, 1]))
    assert moves == []
    assert cache.lens.tolist() == [9, 7]


def test_commit_moves_nodes_that_are_out_of_place():
    cache = _cache()
    keys = cache.layers[0].keys.clone()
    cache.keep_nodes(torch.tensor([[0, 2, 3], [0, 1, 0]]), torch.tensor([3, 2]))
    moved = cache.layers[0].keys
    # Row 0's nodes 2 and 3 (at 6 + 2, 6 + 3) now follow its root; row 1 was in place up to its new length.
    assert moved[0, 0, 6:9, 0].tolist() == [keys[0, 0, 6, 0], keys[0, 0, 8, 0], keys[0, 0, 9, 0]]
    assert torch.equal(moved[1, :, :8], keys[1, :, :8])  # past its new length a row may hold junk
    assert cache.lens.tolist() == [9, 8]
