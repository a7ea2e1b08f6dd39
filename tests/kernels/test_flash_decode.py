"""flash_decode: Triton kernel (compiled on CUDA, interpreter on CPU) vs torch reference vs an independent dense
masked softmax in float64; the sdpa fallback; the dispatcher's tile and split choices."""

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (tests/conftest.py does it too)

from medusa_toolkit.kernels.flash_decode import (  # noqa: E402
    HAS_TRITON,
    INTERPRET,
    MAX_TREE_NODES,
    default_num_splits,
    dense_attention_mask,
    flash_decode,
    flash_decode_reference,
    pack_tree_mask,
    resolve_backend,
    split_kernel_config,
)
from medusa_toolkit.testing.trees import random_tree_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton on CUDA or TRITON_INTERPRET=1")
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def dense_attention(q, k, v, tree_mask=None, kv_lens=None, scale=None, sinks=None) -> torch.Tensor:
    """Independent float64 reference: repeat K/V per query head, build the [T, S] mask row by row, softmax (with one
    extra logit per head for attention sinks, gpt-oss style)."""
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
        if sinks is not None:
            sink = sinks.double().cpu().view(Hq, 1, 1).expand(Hq, T, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[b] = probs @ vr[b].cpu()
    return out


def make_inputs(B, Hq, Hkv, T, S, D, dtype, tree="batch", lens="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    tree_mask = None
    if tree == "shared":
        tree_mask = random_tree_mask(T, gen)
    elif tree == "batch":
        tree_mask = random_tree_mask(T, gen, batch=B)
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


def check(out, q, k, v, tree_mask, kv_lens, sinks=None):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    expected = dense_attention(q, k, v, tree_mask, kv_lens, sinks=sinks)
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


def test_tree_over_max_nodes_routes_to_sdpa():
    # The kernel packs a tree row into one 64-bit word: bigger trees go to SDPA under "auto" on CUDA and are refused
    # by backend="triton" on every machine (before any device check).
    q, k, v, tree_mask, kv_lens = make_inputs(1, 4, 2, MAX_TREE_NODES + 1, 600, 64, torch.float32, "shared", "random")
    with pytest.raises(ValueError, match=f"up to {MAX_TREE_NODES} nodes"):
        flash_decode(q.cpu(), k.cpu(), v.cpu(), tree_mask.cpu(), kv_lens.cpu(), backend="triton")
    assert resolve_backend("auto", SimpleNamespace(is_cuda=True, shape=q.shape), MAX_TREE_NODES + 1) == "sdpa"
    assert resolve_backend("auto", SimpleNamespace(is_cuda=True, shape=q.shape), MAX_TREE_NODES) == "triton"
    check(flash_decode(q, k, v, tree_mask, kv_lens, backend="sdpa"), q, k, v, tree_mask, kv_lens)


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


def _splits(B, T, S, G=4, kv_heads=8, dtype=torch.bfloat16, num_sms=132):
    """The split count flash_decode picks on an H100-sized GPU for a Llama-7B-like shape, and its program count."""
    cfg = split_kernel_config(dtype, 128, G * T, T if T > 1 else None, interpret=False)
    m_blocks = -(-G * T // cfg.block_m)
    s = default_num_splits(
        B, kv_heads, S, m_blocks, num_sms, rows=G * T, head_dim=128, elem_bytes=2, block_n=cfg.block_n
    )
    return s, B * kv_heads * m_blocks * s


def test_default_num_splits_heuristic():
    # Long cache, batch 1: fill the 132 SMs with exactly 2 programs each (no tail wave), not 2 * 132 + a few.
    assert _splits(1, 1, 131072) == (33, 264)
    assert _splits(1, 1, 32768) == (32, 256)  # 33 splits of whole 64-key blocks: the 33rd would be empty
    # A 64-token tree has G * T = 256 rows: its partials are 64x those of plain decoding, so fewer splits.
    s, programs = _splits(1, 64, 4096)
    partial_bytes, kv_bytes = 8 * s * 256 * 128 * 4 * 2, 8 * 4096 * 128 * 2 * 2
    assert s < _splits(1, 1, 4096)[0] and partial_bytes <= kv_bytes
    assert _splits(8, 64, 32768)[0] == 1  # 256 programs already fill the GPU twice
    assert _splits(32, 1, 4096)[0] == 1
    assert default_num_splits(1, 1, 100, 1, num_sms=132) == 1  # one block: nothing to split
    assert default_num_splits(1, 1, 10**7, 1, num_sms=132) <= 128  # capped
    for B, T, S in [(1, 1, 4096), (1, 16, 16384), (2, 64, 65536), (8, 1, 131072)]:
        s, programs = _splits(B, T, S)
        slots = -(-programs // 132) * 132  # programs per SM on the busiest SM, times the SMs
        assert s == 1 or (slots - programs) / slots <= 1 / 8, (B, T, S, s, programs)  # no ragged tail wave


def test_compiled_tiles():
    """The dispatcher's compiled tiles: what the sm_90a AOT test (tests/kernels/test_kernel_aot.py) proves spill-free."""
    for dtype in (torch.float16, torch.bfloat16):
        decode, tree = (split_kernel_config(dtype, 128, m, None, interpret=False) for m in (4, 256))
        assert (decode.block_m, decode.block_n, decode.num_warps) == (16, 64, 4)
        assert (tree.block_m, tree.block_n, tree.num_warps) == (64, 32, 4) and not tree.dot_fp32
    fp32 = split_kernel_config(torch.float32, 128, 256, 64, interpret=False)
    assert fp32.block_m <= 32 and fp32.block_n <= 64 and fp32.dot_fp32 and fp32.has_tree
    assert split_kernel_config(torch.bfloat16, 128, 4, None, block_n=256, interpret=False).block_n == 64  # capped
    assert split_kernel_config(torch.bfloat16, 128, 4, None, block_n=16, interpret=False).block_n == 16
    for bad in (0, 8, 48, 1.5, True):
        with pytest.raises(ValueError, match="power of two"):
            split_kernel_config(torch.bfloat16, 128, 4, None, block_n=bad, interpret=False)


def test_auto_backend():
    q = torch.zeros(1, 1, 1, 64)
    assert resolve_backend("auto", q) == "torch"  # CPU tensors: the reference
    assert resolve_backend("triton", q) == "triton"
    cuda = SimpleNamespace(is_cuda=True, shape=(1, 8, 1, 64))
    assert resolve_backend("auto", cuda) == ("triton" if HAS_TRITON else "sdpa")
    gemma = SimpleNamespace(is_cuda=True, shape=(1, 8, 1, 256))  # a head dim the kernel does not compile
    assert resolve_backend("auto", gemma) == "sdpa"  # not the dense fp32 reference
    assert resolve_backend("auto", gemma, has_sinks=True) == "torch"  # SDPA has no sinks


def test_pack_tree_mask_bits():
    gen = torch.Generator().manual_seed(3)
    for T in (1, 5, 63, 64):
        mask = random_tree_mask(T, gen, batch=2)
        mask[0, T - 1] = True  # the last row sees every node: bit 63 (the sign bit) set for T = 64
        packed = pack_tree_mask(mask)
        assert packed.bits.shape == (2, T) and packed.bits.dtype == torch.int64
        unpacked = (packed.bits[..., None] >> torch.arange(T)) & 1
        assert torch.equal(unpacked.bool(), mask)
        assert pack_tree_mask(packed) is packed
    with pytest.raises(ValueError, match="up to 64"):
        pack_tree_mask(torch.ones(65, 65, dtype=torch.bool))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_attention_sinks(backend, num_splits):
    # gpt-oss: a learned logit per query head joins every row's softmax denominator, with no value.
    q, k, v, tree_mask, kv_lens = make_inputs(2, 8, 2, 4, 300, 64, torch.float32, "batch", "random")
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 2
    out = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=num_splits, backend=backend, sinks=sinks)
    check(out, q, k, v, tree_mask, kv_lens, sinks=sinks)
    without = flash_decode(q, k, v, tree_mask, kv_lens, num_splits=num_splits, backend=backend)
    assert (out - without).abs().max() > 1e-3  # the sinks did something
    with pytest.raises(ValueError, match="no attention sinks"):
        flash_decode(q, k, v, tree_mask, kv_lens, backend="sdpa", sinks=sinks)


@pytest.mark.parametrize("tree", [None, "batch"])
def test_sdpa_backend_matches_dense(tree):
    q, k, v, tree_mask, kv_lens = make_inputs(2, 8, 2, 16, 300, 48, torch.float32, tree, "random")
    k[1, :, int(kv_lens[1]) :] = float("nan")  # padding is never read into the result
    v[1, :, int(kv_lens[1]) :] = float("nan")
    out = flash_decode(q, k, v, tree_mask, kv_lens, backend="sdpa")
    check(out, q, k.nan_to_num(), v.nan_to_num(), tree_mask, kv_lens)


@needs_triton
def test_kv_as_slice_of_a_larger_buffer_and_output_layout():
    # Decoding caches hand over K/V as a view of a bigger preallocated buffer (RowCache: keys[:, :, :need]).
    q, k, v, tree_mask, kv_lens = make_inputs(2, 4, 2, 8, 500, 64, torch.bfloat16, "shared", "random")
    k_buf = torch.zeros(2, 2, 700, 64, dtype=k.dtype, device=k.device)
    v_buf = torch.zeros_like(k_buf)
    k_buf[:, :, :500], v_buf[:, :, :500] = k, v
    packed = pack_tree_mask(tree_mask)
    kv_lens32 = kv_lens.to(torch.int32)  # any integer dtype
    out = flash_decode(q, k_buf[:, :, :500], v_buf[:, :, :500], packed, kv_lens32, num_splits=3, backend="triton")
    check(out, q, k, v, tree_mask, kv_lens)
    # Stored as [B, T, Hq, D]: what transformers continues with, without a copy.
    assert out.transpose(1, 2).is_contiguous()


@needs_triton
def test_many_splits_take_several_lse_tiles():
    # More splits than the reduce kernel's [BLOCK_S, rows] tile (64): its max pass loops over tiles.
    q, k, v, _, kv_lens = make_inputs(2, 2, 1, 1, 70 * 16, 64, torch.float32, None, "random")
    kv_lens[1] = 70 * 16 - 5
    out = flash_decode(q, k, v, None, kv_lens, num_splits=70, backend="triton", block_n=16)
    check(out, q, k, v, None, kv_lens)


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
        (_bad(block_n=8), ValueError, "power of two"),
        (_bad(sinks=torch.zeros(3)), ValueError, "sinks must be"),
        (
            # CPU tensors even on a CUDA machine: what the kernel cannot do is reported before the device is checked.
            _bad(
                q=torch.randn(2, 4, 3, 48), k=torch.randn(2, 2, 10, 48), v=torch.randn(2, 2, 10, 48), backend="triton"
            ),
            ValueError,
            "head dims",
        ),
    ],
)
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        flash_decode(**args)
