"""Batched greedy Medusa decoding: every row must equal that prompt's own greedy decoding, token for token."""

import pytest
import torch

from medusa_toolkit import medusa_generate
from medusa_toolkit.decoding.generate import BatchGenerateOutput, greedy_generate_batch, medusa_generate_batch
from medusa_toolkit.kernels.hf_attention import BACKEND_ENV
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.testing.tiny import BRANCHING, fitted

NEW = 40


@pytest.fixture(scope="module")
def setup():
    model, corpus = fitted("llama")  # shared with test_decoding
    g = torch.Generator().manual_seed(7)
    # Very different lengths; corpus prefixes get long accepted paths, random prompts mostly rejections.
    prompts = [corpus[0, :4], torch.randint(0, 256, (45,), generator=g), torch.randint(0, 256, (1,), generator=g),
               corpus[3, :17]]  # fmt: skip
    refs = [model.base.generate(p[None], do_sample=False, max_new_tokens=NEW)[0] for p in prompts]
    return model, prompts, refs


def pad(prompts, side, pad_id=0):
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(length - p.numel(), length) if side == "left" else slice(0, p.numel())
        ids[i, span], mask[i, span] = p, 1
    return ids, mask


@pytest.mark.parametrize(
    "attn,side,tree",
    [("sdpa", "left", BRANCHING), ("sdpa", "right", "chain-4"), ("medusa_flash_decoding", "left", "chain-4"),
     ("medusa_flash_decoding", "right", BRANCHING), ("eager", "right", "mc_sim_7b_63")],
)  # fmt: skip
def test_batch_equals_per_prompt_greedy(setup, monkeypatch, attn, side, tree):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    model, prompts, refs = setup
    ids, mask = pad(prompts, side, pad_id=7)  # a real token id as padding: only the mask may hide it
    out = medusa_generate_batch(model, ids, mask, NEW, tree=tree, attn_implementation=attn)
    for b, (row, ref) in enumerate(zip(out.rows(), refs)):
        assert torch.equal(row, ref), f"row {b} (prompt length {prompts[b].numel()}) diverged"
    assert out.new_tokens == [NEW] * len(prompts)
    assert all(sum(a) + 1 == NEW for a in out.accept_lengths)
    # Rows accept different numbers of tokens per step (the point of per-row cache lengths), and the heads helped.
    assert len(set(out.steps)) > 1 and max(max(a) for a in out.accept_lengths) >= 3


def test_finished_rows_leave_the_batch_and_eos(setup):
    model, prompts, refs = setup
    eos = int(refs[0][prompts[0].numel() + 5])  # row 0 stops at its 6th new token (or earlier)
    want = [model.base.generate(p[None], do_sample=False, max_new_tokens=NEW, eos_token_id=eos)[0] for p in prompts]
    batch_sizes = []
    step = model.step_fn  # what every decoding step calls

    def spy(input_ids, *args, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        return step(input_ids, *args, **kwargs)

    model.step_fn = spy
    try:
        ids, mask = pad(prompts, "left")
        out = medusa_generate_batch(model, ids, mask, NEW, tree=BRANCHING, eos_token_id=eos)
    finally:
        model.step_fn = step
    assert isinstance(out, BatchGenerateOutput)
    for b, (row, ref) in enumerate(zip(out.rows(), want)):
        assert torch.equal(row, ref), f"row {b} diverged"
        assert torch.equal(out.sequences[b, : out.lengths[b]], ref)
        assert (out.sequences[b, out.lengths[b] :] == out.pad_token_id).all()
    assert batch_sizes[0] == len(prompts) and min(batch_sizes) < len(prompts)  # finished rows stopped costing compute
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_batch_one_with_padding_and_bad_input(setup):
    model, prompts, refs = setup
    ids, mask = pad([prompts[0], prompts[3]], "left")
    out = medusa_generate_batch(model, ids[:1], mask[:1], 20)  # left-padded single prompt
    assert torch.equal(out.rows()[0], refs[0][: prompts[0].numel() + 20])
    single = medusa_generate(model, ids[:1], 20, attention_mask=mask[:1])  # one prompt: its padding is dropped
    assert torch.equal(single.sequences[0], refs[0][: prompts[0].numel() + 20])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        medusa_generate_batch(model, ids, torch.tensor([[1] * ids.shape[1], [0] * ids.shape[1]]), 5)
    with pytest.raises(ValueError, match="attention_mask"):
        medusa_generate_batch(model, ids, mask[:, 1:], 5)
    with pytest.raises(ValueError, match="streamer"):
        medusa_generate(model, ids, 5, attention_mask=mask, streamer=object())


@pytest.mark.parametrize("side", ["left", "right"])
def test_base_greedy_without_heads(setup, side):
    """`greedy_generate_batch`: the base alone through the same loop (1-node tree), each row its own greedy text."""
    model, prompts, refs = setup
    ids, mask = pad(prompts, side, pad_id=7)
    rows = greedy_generate_batch(model.base, ids, mask, NEW, eos_token_id=[])
    assert rows == [ref[p.numel() :].tolist() for p, ref in zip(prompts, refs)]
    with pytest.raises(ValueError, match="no heads"):
        MedusaModel(model.base, None).medusa_logits(torch.zeros(1, model.base.config.hidden_size), 1)
