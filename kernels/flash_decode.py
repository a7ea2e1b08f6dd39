"""Flash-Decoding attention for plain decoding and Medusa tree verification.

`flash_decode(q, k, v, tree_mask, kv_lens)` attends T new query tokens to a KV cache that already holds them as its
last T valid positions. Every new token sees the whole prefix; among the new tokens it sees what `tree_mask` allows
(causal when None). Two implementations share those semantics:

- "triton": Flash-Decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html). The key sequence of every
  (batch, kv head) is cut into `num_splits` chunks processed by separate programs, so even batch 1 fills the GPU. Each
  program runs an online softmax over its chunk and writes a partial output plus its log-sum-exp; a second small kernel
  rescales and sums the partials. One program serves all Hq/Hkv query heads of its kv head by stacking their
  (group x T) query rows into the M dimension of `tl.dot`, so K/V are read once per kv head and never repeated.
- "torch": a readable dense reference (`flash_decode_reference`), used on CPU and in tests.

Note on FlashDecoding++'s "unified max" (a fixed max instead of the online max, with a recompute fallback when a score
overflows it): it does not help here. Decoding is bound by reading K/V from memory; the online rescale is a handful of
FMAs on a [BLOCK_M, D] register tile per K/V block, and the cross-split reduce is a tiny kernel whose cost is launch
latency, which a fixed max does not remove (partials still live in different programs). What a fixed max would buy is
the removal of one exp per block, paid for by a per-model calibrated threshold and a slow recompute path whenever a
head's scores exceed it (attention sinks and outlier heads make that common), and every row of a 64-token tree can
trigger it. With fp32 accumulators overflow is not a concern anyway, so we keep the exact online softmax.

Triton on CPU: set `TRITON_INTERPRET=1` before this module is imported (the @triton.jit decorators read it).
"""

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _jit = triton.jit
except ImportError:  # triton is Linux-only: keep the module importable, the torch backend still works
    HAS_TRITON = False

    class tl:  # noqa: N801 - stand-in so the kernel signatures below still evaluate
        constexpr = None

    def _jit(fn):
        return fn


# Whether the kernels below were decorated in interpreter mode (decided once, at import).
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------


@_jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    start_n,
    hi,
    prefix_end,
    t_idx,
    row_ok,
    tree_base,
    stride_kn,
    stride_vn,
    stride_ti,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    HAS_TREE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N). Scores live in log2 units (exp2 is cheaper)."""
    n = start_n + offs_n
    if MASKED:
        n_ok = n < hi
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:  # a full prefix block: every key is valid and visible to every query row
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)

    if DOT_FP32:
        qk = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt)  # fp16/bf16 tensor cores, fp32 accumulate
    qk = qk * qk_scale

    if MASKED:
        j = n - prefix_end  # index of the key among the T new tokens (negative: prefix key)
        if HAS_TREE:
            tree_ok = (j[None, :] >= 0) & n_ok[None, :] & row_ok[:, None]
            tree = tl.load(tree_base + t_idx[:, None] * stride_ti + j[None, :], mask=tree_ok, other=0)
            allowed = (j[None, :] < 0) | (tree != 0)
        else:
            allowed = j[None, :] <= t_idx[:, None]  # causal among the new tokens; prefix keys have j < 0
        qk = tl.where(allowed & n_ok[None, :], qk, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row may have seen no visible key yet: shift by 0 instead of -inf so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@_jit
def _flash_decode_split_kernel(
    Q,
    K,
    V,
    TREE,
    KV_LENS,
    Out,
    O_PART,
    LSE_PART,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_tb,
    stride_ti,
    stride_ob,
    stride_oh,
    stride_ot,
    S,
    T,
    G,
    H_KV,
    num_splits,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TREE: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WRITE_OUT: tl.constexpr,
):
    """Grid (split, batch * kv head, query-row block). Rows are r = g * T + t: query head kv_head * G + g, token t."""
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_kb overflows int32 on long caches
    m_block = tl.program_id(2)
    b = bh // H_KV
    kvh = bh % H_KV

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    M = G * T
    row_ok = offs_m < M
    g = offs_m // T
    t_idx = offs_m % T
    d_ok = offs_d < HEAD_DIM  # head dims 80/96 are padded to a power-of-two tile

    q_ptrs = Q + b * stride_qb + (kvh * G + g)[:, None] * stride_qh + t_idx[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    tree_base = TREE + b * stride_tb

    if HAS_KV_LENS:
        kv_len = tl.load(KV_LENS + b)
    else:
        kv_len = S
    prefix_end = kv_len - T  # keys before this are the prefix, visible to every new token
    # Split this row's own valid length (not S) so that padding does not unbalance the splits; chunks are whole blocks.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)
    # Whole blocks before the new tokens need no mask at all; only the tail block(s) of the chunk holding the last T
    # keys (and the padding boundary) pay for the tree mask. A split past kv_len runs no iteration at all.
    unmasked_hi = lo + tl.maximum(tl.minimum(hi, prefix_end) - lo, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, unmasked_hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, start_n, hi, prefix_end, t_idx, row_ok, tree_base,
            stride_kn, stride_vn, stride_ti, qk_scale, offs_n, offs_d, d_ok,
            MASKED=False, HAS_TREE=HAS_TREE, DOT_FP32=DOT_FP32,
        )  # fmt: skip
    for start_n in range(unmasked_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, start_n, hi, prefix_end, t_idx, row_ok, tree_base,
            stride_kn, stride_vn, stride_ti, qk_scale, offs_n, offs_d, d_ok,
            MASKED=True, HAS_TREE=HAS_TREE, DOT_FP32=DOT_FP32,
        )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a split that saw only padding: output 0, lse -inf
    out = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if WRITE_OUT:  # a single split is already the final answer: skip the reduce kernel
        o_ptrs = Out + b * stride_ob + (kvh * G + g)[:, None] * stride_oh + t_idx[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        # Partials are [B * Hkv, num_splits, M, HEAD_DIM] (fp32) and lse [B * Hkv, num_splits, M] (log2 units).
        row = (bh * num_splits + split) * M + offs_m
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        tl.store(LSE_PART + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)


@_jit
def _flash_decode_reduce_kernel(
    O_PART,
    LSE_PART,
    Out,
    stride_ob,
    stride_oh,
    stride_ot,
    T,
    G,
    H_KV,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (row block, batch * kv head): out = sum_s 2^(lse_s - lse_max) * o_s / sum_s 2^(lse_s - lse_max)."""
    r_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H_KV
    kvh = bh % H_KV
    M = G * T
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < M
    d_ok = offs_d < HEAD_DIM
    base = bh * num_splits * M + offs_r

    lse_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(LSE_PART + base + s * M, mask=row_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    # Splits holding only padding have lse = -inf and get weight 0; a row with no visible key at all gets output 0.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(LSE_PART + base + s * M, mask=row_ok, other=float("-inf"))
        w = tl.math.exp2(lse - lse_max)
        part = tl.load(
            O_PART + (base + s * M)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :]
        )
        acc += w[:, None] * part
        w_sum += w
    out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]

    g = offs_r // T
    t_idx = offs_r % T
    o_ptrs = Out + b * stride_ob + (kvh * G + g)[:, None] * stride_oh + t_idx[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, seq_len: int, m_blocks: int, num_sms: int) -> int:
    """How many chunks to cut each row's keys into.

    Heuristic: the (batch, kv head, query block) programs alone give `ctas` programs. If they already fill the GPU
    (>= one per SM) splitting only adds the reduce, so use 1. Otherwise aim for about two waves (2 * num_sms programs)
    so the memory system stays busy, but keep at least 256 keys per split (below that the fixed cost of loading q,
    writing partials and reducing them outweighs streaming K/V) and at most 128 splits.
    Examples on an H100 (132 SMs), Llama-7B-like 8 kv heads: B=1, S=128k -> 33 splits (~4k keys each);
    B=1, S=1k -> 4; B=8 -> 5 (64 programs otherwise); B=32 -> 1.
    """
    ctas = batch * kv_heads * m_blocks
    if ctas >= num_sms:
        return 1
    return max(1, min(math.ceil(2 * num_sms / ctas), seq_len // 256, 128))


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    num_splits: int | None,
    backend: str,
    check_kv_lens_values: bool,
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4D tensor [B, H, L, D], got {getattr(x, 'shape', type(x))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    _, Hkv, S, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {k.shape[0]}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has {D}, k/v have {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if T == 0 or T > S:
        raise ValueError(f"need 1 <= T <= S: got T={T} new tokens for a cache of S={S} keys (the cache must hold them)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; expected one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"device mismatch: q {q.device}, k {k.device}, v {v.device}")
    if tree_mask is not None:
        if tree_mask.dtype != torch.bool:
            raise TypeError(f"tree_mask must be a bool tensor, got {tree_mask.dtype}")
        if tuple(tree_mask.shape) not in ((T, T), (B, T, T)):
            raise ValueError(f"tree_mask must be [T, T] or [B, T, T] with T={T}, B={B}; got {tuple(tree_mask.shape)}")
        if tree_mask.device != q.device:
            raise ValueError(f"tree_mask is on {tree_mask.device}, q on {q.device}")
    if kv_lens is not None:
        if kv_lens.dtype.is_floating_point or kv_lens.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"kv_lens must be an integer tensor, got {kv_lens.dtype}")
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens must have shape [B] = [{B}], got {tuple(kv_lens.shape)}")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens is on {kv_lens.device}, q on {q.device}")
        if check_kv_lens_values:  # one small device sync; callers in a hot loop may check once per step instead
            lo, hi = int(kv_lens.min()), int(kv_lens.max())
            if lo < T:
                raise ValueError(f"kv_lens must be >= T={T} (the cache holds the new tokens), got min {lo}")
            if hi > S:
                raise ValueError(f"kv_lens must be <= S={S} (the cache length), got max {hi}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


def dense_attention_mask(
    T: int,
    S: int,
    tree_mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Expand the compact (tree_mask, kv_lens) description into a dense bool mask [B, T, S] (True = attend).

    Row b's new tokens are keys [kv_lens[b] - T, kv_lens[b]); keys before them are the prefix (visible to all new
    tokens), keys at or after kv_lens[b] are padding. `tree_mask` None means causal among the new tokens.
    """
    if kv_lens is not None:
        batch, device = kv_lens.shape[0], kv_lens.device
    elif tree_mask is not None:
        device = tree_mask.device
        batch = tree_mask.shape[0] if tree_mask.dim() == 3 else batch
    lens = kv_lens.long() if kv_lens is not None else torch.full((batch,), S, dtype=torch.long, device=device)
    if tree_mask is None:
        tree_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    tree = tree_mask.expand(batch, T, T)

    pos = torch.arange(S, device=device)
    j = pos[None, :] - (lens - T)[:, None]  # [B, S]: index among the new tokens, negative for prefix keys
    valid = pos[None, :] < lens[:, None]
    new_ok = tree.gather(2, j.clamp(0, T - 1)[:, None, :].expand(batch, T, S))  # garbage where j<0 or padding
    return valid[:, None, :] & ((j < 0)[:, None, :] | new_ok)


def flash_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Readable torch implementation of `flash_decode` (no input checks): dense fp32 masked softmax.

    GQA is handled like the kernel does it, by viewing the Hq/Hkv query heads of a kv head as extra query rows.
    Rows with no visible key return 0 (the kernel's convention) rather than NaN.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    allowed = dense_attention_mask(T, S, tree_mask, kv_lens, batch=B, device=q.device)  # [B, T, S]

    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*T, S]
    scores = scores.view(B, Hkv, G, T, S).masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    # Padding may hold garbage (even NaN, e.g. from torch.empty): 0 * NaN would leak into the sum, so zero it.
    v = v.float().masked_fill(~allowed.any(dim=1)[:, None, :, None], 0.0)
    out = probs.view(B, Hkv, G * T, S) @ v
    return out.view(B, Hq, T, D).to(q.dtype)


def _flash_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    scale: float,
    num_splits: int | None,
    block_n: int | None,
) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (use backend='torch' or 'auto')")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "medusa_toolkit.kernels (or use backend='torch'/'auto')"
        )
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    M = G * T
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head dims {SUPPORTED_HEAD_DIMS}, got {D} (use backend='torch')")
    # The kernels assume a unit stride along the head dim (true for HF's q/k/v); anything else is copied once.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))

    # Tiles: tl.dot needs >= 16 per dim. The interpreter runs one numpy op per tile, so it prefers big tiles.
    block_m = max(16, min(triton.next_power_of_2(M), 128 if INTERPRET else 64))
    # fp32 K/V tiles are twice as big: halve them so two pipeline stages still fit in shared memory.
    block_n = block_n or (128 if INTERPRET else 32 if q.dtype == torch.float32 else 64)
    block_d = triton.next_power_of_2(D)
    m_blocks = triton.cdiv(M, block_m)
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 8
        num_splits = default_num_splits(B, Hkv, S, m_blocks, num_sms)
    # The interpreter's tl.dot is wrong on fp16/bf16, and fp32 inputs deserve exact (not tf32) dots on GPUs.
    dot_fp32 = INTERPRET or q.dtype == torch.float32

    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    if num_splits > 1:
        o_part = torch.empty(B * Hkv, num_splits, M, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B * Hkv, num_splits, M, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused: the split kernel writes `out` directly
    if tree_mask is not None:
        tree = tree_mask.view(torch.uint8)  # same bytes, a dtype every Triton version loads
        stride_tb = tree.stride(0) if tree.dim() == 3 else 0  # [T, T] is shared by the whole batch
        stride_ti = tree.stride(-2)
        if tree.stride(-1) != 1:
            tree = tree.contiguous()
            stride_tb, stride_ti = (T * T if tree.dim() == 3 else 0), T
    else:
        tree, stride_tb, stride_ti = out, 0, 0  # dummy pointer, never read (HAS_TREE=False)
    lens = kv_lens.to(torch.int32).contiguous() if kv_lens is not None else out

    _flash_decode_split_kernel[(num_splits, B * Hkv, m_blocks)](
        q, k, v, tree, lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_tb, stride_ti,
        out.stride(0), out.stride(1), out.stride(2),
        S, T, G, Hkv, num_splits, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_TREE=tree_mask is not None, HAS_KV_LENS=kv_lens is not None, DOT_FP32=dot_fp32,
        WRITE_OUT=num_splits == 1,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        block_r = 64 if INTERPRET else 16
        _flash_decode_reduce_kernel[(triton.cdiv(M, block_r), B * Hkv)](
            o_part, lse_part, out,
            out.stride(0), out.stride(1), out.stride(2),
            T, G, Hkv, num_splits,
            HEAD_DIM=D, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors with a supported head dim, 'torch' otherwise; others pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if HAS_TRITON and q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS else "torch"


def flash_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
    *,
    block_n: int | None = None,
    check_kv_lens: bool = True,
) -> torch.Tensor:
    """Attention of T new tokens over a KV cache that already contains them (Flash-Decoding).

    Args:
        q: [B, Hq, T, D] queries of the new tokens (T = 1 for plain decoding, the tree size for verification).
        k, v: [B, Hkv, S, D] the whole cache, the new tokens being the last T valid positions; Hq % Hkv == 0.
        tree_mask: bool [T, T] or [B, T, T]; new token i sees new token j iff tree_mask[i, j] (and every prefix
            key). None: causal among the new tokens.
        kv_lens: int [B], valid keys of row b are [0, kv_lens[b]) (T <= kv_lens[b] <= S); the rest is padding.
            None: all S keys are valid.
        scale: softmax scale, default D ** -0.5.
        num_splits: key chunks per row processed in parallel (triton only); None picks `default_num_splits`.
        backend: "triton", "torch" (dense reference) or "auto" (triton on CUDA, torch elsewhere).
        block_n: keys per tile of the triton kernel (also the split granularity); None picks a default.
        check_kv_lens: verify T <= kv_lens <= S (costs one device sync).

    Returns:
        [B, Hq, T, D] in q's dtype, accumulated in fp32. fp32/fp16/bf16; triton supports head dims 64, 80, 96, 128.
    """
    _check_inputs(q, k, v, tree_mask, kv_lens, num_splits, backend, check_kv_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q) == "torch":
        return flash_decode_reference(q, k, v, tree_mask, kv_lens, scale)
    return _flash_decode_triton(q, k, v, tree_mask, kv_lens, scale, num_splits, block_n)
