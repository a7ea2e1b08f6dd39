"""The "medusa_tree_decoding" attention implementation inside real transformers models (tiny random weights): on CPU
(the Triton interpreter for the triton backend) and, on a CUDA machine, compiled on the GPU."""

import os

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (tests/conftest.py does it too)

from medusa_toolkit.kernels import hf_attention  # noqa: E402
from medusa_toolkit.kernels.flash_decode import HAS_TRITON, INTERPRET  # noqa: E402
from medusa_toolkit.kernels.hf_attention import ATTN_NAME, get_backend, register_attention, set_backend  # noqa: E402
from medusa_toolkit.testing.tiny import tiny_base  # noqa: E402
from medusa_toolkit.testing.trees import random_tree_mask, tree_depths  # noqa: E402

register_attention()  # the tests below select ATTN_NAME by name

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
# fp32 logits of a 2-layer model: exact to rounding on CPU; cuBLAS and the compiled kernel round differently.
LOGIT_TOL = 1e-5 if DEVICE == "cpu" else 1e-4
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))]
FAMILIES = ("llama", "qwen2")


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """2 layers, 4 query heads / 2 kv heads of dim 64 (a head dim the Triton kernel supports), float32, seeded, on
    DEVICE (a CPU model cannot run the compiled kernel, and CUDA machines have no interpreter switched on)."""
    config = {"max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, **overrides}
    return tiny_base(family, vocab=128, head_dim=64, **config).to(DEVICE)


@pytest.fixture
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend(None)


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """Counts flash_decode calls made by the attention function (to prove the kernel path really ran)."""
    calls = []
    original = hf_attention.flash_decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "flash_decode", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_sdpa(family, backend, count_kernel_calls):
    model = tiny_model(family)
    batch = 1 if backend == "triton" and INTERPRET else 2  # the interpreter runs one program at a time: keep it short
    ids = torch.randint(2, 128, (batch, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
        model.set_attn_implementation(ATTN_NAME)
        got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    assert torch.equal(got, expected)
    assert len(count_kernel_calls) == 2 * 20 and set(count_kernel_calls) == {backend}  # prefill + 19 steps, 2 layers


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tree_forward_matches_sdpa_with_dense_mask(family, backend, count_kernel_calls):
    B, P, T = 2, 11, 7
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(2, 128, (B, P), generator=gen).to(DEVICE)
    tree_tokens = torch.randint(2, 128, (B, T), generator=gen).to(DEVICE)
    tree_mask = random_tree_mask(T, gen, batch=B).to(DEVICE)  # [B, T, T]: a different tree per row
    position_ids = P + tree_depths(tree_mask)

    # What the sdpa model needs instead: a dense additive [B, 1, T, P + T] mask.
    allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool, device=DEVICE), tree_mask], dim=-1)[:, None]
    dense = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)

    with torch.no_grad():
        cache = model(prefix, use_cache=True).cache
        expected = model(tree_tokens, cache=cache, attention_mask=dense, position_ids=position_ids).logits
        model.set_attn_implementation(ATTN_NAME)
        cache = model(prefix, use_cache=True).cache
        count_kernel_calls.clear()
        got = model(
            tree_tokens,
            cache=cache,
            position_ids=position_ids,
            medusa_tree_mask=tree_mask,
            medusa_kv_lens=torch.full((B,), P + T, device=DEVICE),
        ).logits
    torch.testing.assert_close(got, expected, atol=LOGIT_TOL, rtol=LOGIT_TOL)
    assert count_kernel_calls == [backend] * 2


def test_padded_batch_falls_back_to_sdpa(count_kernel_calls):
    model = tiny_model("llama")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
        model.set_attn_implementation(ATTN_NAME)
        got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(got, expected)
    assert count_kernel_calls == []  # a padded mask is not expressible without medusa_kv_lens: SDPA handled it


def test_sliding_window_and_tree_kwargs_use_dense_path(count_kernel_calls):
    # Mistral passes sliding_window on every call; once the cache is longer than the window the kernel cannot apply
    # it, so the attention function merges the tree with transformers' window mask and runs SDPA.
    model = tiny_model("mistral", sliding_window=6)
    ids = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=10)
        model.set_attn_implementation(ATTN_NAME)
        got = model.generate(ids, do_sample=False, max_new_tokens=10)
    assert torch.equal(got, expected)
    assert 0 < len(count_kernel_calls) < 2 * 10  # the kernel ran while the cache fit in the window, SDPA after

    # Tree verification past the window: causal tree == plain causal attention, so results must agree with sdpa.
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        cache = model(ids, use_cache=True).cache
        new = torch.randint(2, 128, (1, 4), generator=torch.Generator().manual_seed(5)).to(DEVICE)
        expected = model(new, cache=cache).logits
        model.set_attn_implementation(ATTN_NAME)
        cache = model(ids, use_cache=True).cache
        got = model(new, cache=cache, medusa_tree_mask=torch.ones(4, 4, dtype=torch.bool, device=DEVICE).tril()).logits
    torch.testing.assert_close(got, expected, atol=LOGIT_TOL, rtol=LOGIT_TOL)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_attention_sinks_are_applied(backend, count_kernel_calls):
    # gpt-oss passes learned per-head sinks (s_aux) on every call. The kernel path must apply them (the reduce step
    # adds them to the softmax denominator) and so must the dense path (its sliding-window layers, once the cache is
    # longer than the window); transformers' eager gpt-oss attention is the reference.
    model = tiny_model(
        "gpt_oss", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn="eager",  # sdpa has no sinks
    )  # fmt: skip
    config = model.config
    assert config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # large sinks: dropping them changes the tokens
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
        model.set_attn_implementation(ATTN_NAME)
        got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_().sub_(1e4)  # sinks that no longer matter: proof that they did above
        model.set_attn_implementation("eager")
        no_sinks = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    assert torch.equal(got, expected)
    assert not torch.equal(no_sinks, expected)
    # Full-attention layer every step, the sliding layer until its window fills (then the dense eager path).
    assert 12 < len(count_kernel_calls) < 2 * 12 and set(count_kernel_calls) == {backend}


def test_tree_mask_packed_once_per_forward(monkeypatch):
    # The tree mask is packed into bit words at the first layer and reused by the others (same tensor object); the
    # next forward's layer 0 packs again, so a mask edited in place between forwards is seen.
    packs = []
    original = hf_attention.pack_tree_mask
    monkeypatch.setattr(hf_attention, "pack_tree_mask", lambda m: packs.append(m) or original(m))
    model = tiny_model("llama", num_hidden_layers=3)
    tree = torch.ones(4, 4, dtype=torch.bool, device=DEVICE).tril()
    ids = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    new = torch.randint(2, 128, (1, 4), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    model.set_attn_implementation(ATTN_NAME)
    with torch.no_grad():
        for _ in range(2):
            cache = model(ids, use_cache=True).cache
            model(new, cache=cache, medusa_tree_mask=tree)
    assert len(packs) == 2 and all(p is tree for p in packs)


def test_registration_is_idempotent():
    assert register_attention() == register_attention() == ATTN_NAME
    assert "flash" not in ATTN_NAME  # transformers would treat the name as a FlashAttention variant
    assert AttentionInterface._global_mapping[ATTN_NAME] is hf_attention.medusa_attention_forward
    assert ATTN_NAME in AttentionMaskInterface._global_mapping


def test_backend_override(monkeypatch):
    monkeypatch.delenv(hf_attention.BACKEND_ENV, raising=False)
    assert get_backend() == "auto"
    monkeypatch.setenv(hf_attention.BACKEND_ENV, "torch")
    assert get_backend() == "torch"
    set_backend("triton")
    try:
        assert get_backend() == "triton"  # the setter wins over the environment
    finally:
        set_backend(None)
    with pytest.raises(ValueError, match="unknown backend"):
        set_backend("cuda")
    monkeypatch.setenv(hf_attention.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        get_backend()
