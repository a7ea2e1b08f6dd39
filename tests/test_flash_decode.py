"""flash_decode: Triton kernel (interpreter on CPU) vs torch reference vs an independent dense masked softmax."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (tests/conftest.py does it too)

from medusa_toolkit.kernels import flash_decode, flash_decode_reference  # noqa: E402
from medusa_toolkit.kernels.flash_decode import (  # noqa: E402
    HAS_TRITON,
    INTERPRET,
    default_num_splits,
    dense_attention_mask,
    resolve_backend,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton on CUDA or TRITON_INTERPRET=1")
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_tree_mask(T: int, gen: torch.Generator) -> torch.Tensor:
    """A valid tree mask: node i (> 0) hangs under a random earlier node and sees itself and its ancestors."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if i > 0:
            parent = int(torch.randint(0, i, (1,), generator=gen))
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def dense_attention(q, k, v, tree_mask=None, kv_lens=None, scale=None) -> torch.Tensor:
    """Independent float64 reference: repeat K/V per query head, build the [T, S] mask row by row, softmax."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    groups = Hq // k.shape[1]
    kr = k.double().repeat_interleave(groups, dim=1)
    vr = v.double().repeat_interleave(groups, dim=1)
    out = torch.empty(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        length = S if kv_lens is None else int(kv_lens[b])
        tree = (
            torch.ones(T, T).tril().bool()
            if tree_mask is None
            else (tree_mask if tree_mask.dim() == 2 else tree_mask[b])
        )
        allowed = torch.zeros(T, S, dtype=torch.bool)
        allowed[:, : length - T] = True
        allowed[:, length - T : length] = tree.cpu()
        scores = (q[b].double().cpu() @ kr[b].cpu().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = torch.softmax(scores, dim=-1) @ vr[b].cpu()
    return out


def make_inputs(B, Hq, Hkv, T, S, D, dtype, tree="batch", lens="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    tree_mask = None
    if tree == "shared":
        tree_mask = random_tree_mask(T, gen)
    elif tree == "batch":
        tree_mask = torch.stack([random_tree_mask(T, gen) for _ in range(B)])
    kv_lens = None
    if lens == "random":  # different per row, the first row always full so that some padding-free row exists
        kv_lens = torch.randint(T, S + 1, (B,), generator=gen)
        kv_lens[0] = S
    to = {"device": DEVICE}
    return (
        q.to(**to),
        k.to(**to),
        v.to(**to),
        None if tree_mask is None else tree_mask.to(**to),
        None if kv_lens is None else kv_lens.to(**to),
    )


def check(out, q, k, v, tree_mask, kv_lens):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    expected = dense_attention(q, k, v, tree_mask, kv_lens)
    torch.testing.assert_close(out.double().cpu(), expected, atol=ATOL[q.dtype], rtol=0)


# (B, Hq, Hkv, T, S, D, dtype, tree, lens, num_splits, block_n)
TRITON_CASES = [
    (1, 4, 1, 1, 2000, 128, torch.float32, None, None, None, None),  # plain decoding, MQA, default splits
    (2, 4, 2, 1, 777, 64, torch.float16, None, "random", 4, 64),  # decoding with padding
    (2, 4, 2, 4, 300, 64, torch.float32, "shared", "random", 3, 64),
    (2, 4, 4, 16, 1000, 80, torch.float16, "batch", "random", 4, 128),  # MHA, padded head dim
    (1, 4, 1, 16, 513, 96, torch.float32, None, None, 2, 128),  # causal among new tokens
    (2, 4, 2, 64, 700, 128, torch.float32, "batch", "random", 3, 128),  # big tree: 2 query-row blocks
    (1, 4, 2, 64, 200, 64, torch.bfloat16, "shared", None, 1, 64),  # single split writes the output directly
    (2, 4, 1, 16, 1500, 64, torch.bfloat16, "batch", "random", 5, 256),
    (3, 4, 2, 4, 900, 96, torch.float16, "batch", "random", 6, 128),
    (1, 4, 1, 1, 333, 80, torch.bfloat16, None, "random", 2, 64),
    (1, 8, 2, 16, 1200, 128, torch.float32, "shared", "random", 7, 128),
]


@needs_triton
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,dtype,tree,lens,num_splits,block_n", TRITON_CASES)
def test_triton_matches_dense(B, Hq, Hkv, T, S, D, dtype, tree, lens, num_splits, block_n):
    q, k, v, tree_mask, kv_lens = make_inputs(B, Hq, Hkv, T, S, D, dtype, tree, lens)
    out = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=num_splits, backend="triton", block_n=block_n)
    check(out, q, k, v, tree_mask, kv_lens)
    ref = flash_decode(q, k, v, tree_mask, kv_lens, backend="torch")
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4, 16, 64])
def test_torch_backend_matches_dense(D, dtype, T):
    q, k, v, tree_mask, kv_lens = make_inputs(3, 4, 2, T, 2 * T + 100, D, dtype, "batch", "random", seed=T + D)
    check(flash_decode(q, k, v, tree_mask, kv_lens, backend="torch"), q, k, v, tree_mask, kv_lens)


@needs_triton
def test_split_holding_only_padding():
    # Row 1 has 100 valid keys: with 8 splits of >= 64 keys, splits 2..7 hold only padding (lse = -inf).
    q, k, v, tree_mask, _ = make_inputs(2, 4, 2, 8, 1024, 64, torch.float32, "batch", None)
    kv_lens = torch.tensor([1024, 100], device=DEVICE)
    k[1, :, 100:] = float("nan")  # padding must never be read into the result
    v[1, :, 100:] = float("nan")
    out = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=8, backend="triton", block_n=64)
    check(out, q, k.nan_to_num(), v.nan_to_num(), tree_mask, kv_lens)
    ref = flash_decode(q, k, v, tree_mask, kv_lens, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@needs_triton
def test_more_splits_than_chunks():
    q, k, v, tree_mask, kv_lens = make_inputs(1, 4, 2, 4, 300, 64, torch.float32, "shared", "random")
    out = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=32, backend="triton", block_n=128)
    check(out, q, k, v, tree_mask, kv_lens)


@needs_triton
def test_large_tree_T128():
    q, k, v, tree_mask, kv_lens = make_inputs(1, 4, 2, 128, 600, 64, torch.float32, "shared", "random")
    out = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=2, backend="triton", block_n=256)
    check(out, q, k, v, tree_mask, kv_lens)


@needs_triton
def test_non_contiguous_query_and_custom_scale():
    # HF hands over q as a transposed view of [B, T, Hq, D]
    q, k, v, tree_mask, kv_lens = make_inputs(2, 4, 2, 4, 400, 64, torch.float32, "batch", "random")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = flash_decode(q, k, v, tree_mask, kv_lens, scale=0.3, num_splits=2, backend="triton", block_n=128)
    torch.testing.assert_close(
        out.double().cpu(), dense_attention(q, k, v, tree_mask, kv_lens, scale=0.3), atol=2e-5, rtol=0
    )


def test_dense_attention_mask_layout():
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    mask = dense_attention_mask(3, 6, tree, torch.tensor([6, 4]))
    assert mask.shape == (2, 3, 6)
    assert mask[0, :, :3].all() and torch.equal(mask[0, :, 3:], tree)
    assert mask[1, :, :1].all() and torch.equal(mask[1, :, 1:4], tree) and not mask[1, :, 4:].any()
    causal = dense_attention_mask(2, 3, batch=1)
    assert torch.equal(causal[0], torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))


def test_reference_row_without_visible_key_is_zero():
    q, k, v = torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64)
    tree = torch.tensor([[True, False], [False, False]])  # row 1 sees nothing (invalid tree, but no NaN)
    out = flash_decode_reference(q, k, v, tree)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


def test_default_num_splits_heuristic():
    assert default_num_splits(1, 8, 131072, 1, num_sms=132) == 33
    assert default_num_splits(1, 8, 1024, 1, num_sms=132) == 4
    assert default_num_splits(32, 8, 131072, 1, num_sms=132) == 1
    assert default_num_splits(1, 1, 100, 1, num_sms=132) == 1  # tiny caches are not split
    assert default_num_splits(1, 1, 10**7, 1, num_sms=132) == 128  # capped


def test_auto_backend():
    q = torch.zeros(1, 1, 1, 64)
    assert resolve_backend("auto", q) == "torch"  # CPU tensors: the reference
    assert resolve_backend("triton", q) == "triton"


def _bad(**overrides):
    args = {
        "q": torch.randn(2, 4, 3, 64),
        "k": torch.randn(2, 2, 10, 64),
        "v": torch.randn(2, 2, 10, 64),
        "tree_mask": None,
        "kv_lens": None,
        "backend": "torch",
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args,error,match",
    [
        (_bad(q=torch.randn(4, 3, 64)), ValueError, "4D"),
        (_bad(v=torch.randn(2, 2, 11, 64)), ValueError, "same shape"),
        (_bad(q=torch.randn(1, 4, 3, 64)), ValueError, "batch"),
        (_bad(q=torch.randn(2, 3, 3, 64)), ValueError, "multiple of kv heads"),
        (_bad(q=torch.randn(2, 4, 3, 32)), ValueError, "head dim mismatch"),
        (_bad(q=torch.randn(2, 4, 11, 64)), ValueError, "T <= S"),
        (_bad(q=torch.randn(2, 4, 3, 64).half()), TypeError, "dtype mismatch"),
        (
            _bad(
                q=torch.randn(2, 4, 3, 64).double(),
                k=torch.randn(2, 2, 10, 64).double(),
                v=torch.randn(2, 2, 10, 64).double(),
            ),
            TypeError,
            "unsupported dtype",
        ),
        (_bad(kv_lens=torch.tensor([10, 2])), ValueError, "kv_lens must be >= T"),
        (_bad(kv_lens=torch.tensor([11, 10])), ValueError, "kv_lens must be <= S"),
        (_bad(kv_lens=torch.tensor([10.0, 10.0])), TypeError, "integer"),
        (_bad(kv_lens=torch.tensor([10, 10, 10])), ValueError, "shape"),
        (_bad(tree_mask=torch.ones(3, 3)), TypeError, "bool"),
        (_bad(tree_mask=torch.ones(4, 4, dtype=torch.bool)), ValueError, "tree_mask must be"),
        (_bad(backend="cuda"), ValueError, "unknown backend"),
        (_bad(num_splits=0), ValueError, "num_splits"),
        (
            _bad(
                q=torch.randn(2, 4, 3, 48), k=torch.randn(2, 2, 10, 48), v=torch.randn(2, 2, 10, 48), backend="triton"
            ),
            ValueError,
            "head dims",
        ),
    ],
)
def test_bad_inputs(args, error, match):
    if args["backend"] == "triton" and not TRITON_OK:
        pytest.skip("triton unavailable")
    with pytest.raises(error, match=match):
        flash_decode(**args)
