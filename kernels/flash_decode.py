"""Flash-Decoding attention for plain decoding and Medusa tree verification.

`flash_decode(q, k, v, tree_mask, kv_lens)` attends T new query tokens to a KV cache that already holds them as its
last T valid positions. Every new token sees the whole prefix; among the new tokens it sees what `tree_mask` allows
(causal when None). Three implementations share those semantics:

- "triton": Flash-Decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html). The key sequence of every
  (batch, kv head) is cut into `num_splits` chunks processed by separate programs, so even batch 1 fills the GPU. Each
  program runs an online softmax over its chunk and writes a partial output plus its log-sum-exp; a second small kernel
  rescales and sums the partials. One program serves all Hq/Hkv query heads of its kv head by stacking their
  (group x T) query rows into the M dimension of `tl.dot`, so K/V are read once per kv head and never repeated.
  The tree mask reaches the kernel packed: one int64 word per query row (`pack_tree_mask`, trees <= 64 nodes), so
  the masked tail block tests a bit (`(bits >> j) & 1`) instead of gathering a [rows, keys] byte tile.
- "sdpa": torch's scaled_dot_product_attention with the dense mask. What "auto" picks on CUDA for what the kernel
  does not compile: head dims outside SUPPORTED_HEAD_DIMS (e.g. Gemma's 256), trees over MAX_TREE_NODES.
- "torch": a readable dense fp32 reference (`flash_decode_reference`), used on CPU and as the tests' oracle.

Note on FlashDecoding++'s "unified max" (a fixed max instead of the online max, with a recompute fallback when a score
overflows it): it does not help here. Decoding is bound by reading K/V from memory; the online rescale is a handful of
FMAs on a [BLOCK_M, D] register tile per K/V block, and the cross-split reduce is a tiny kernel whose cost is launch
latency, which a fixed max does not remove (partials still live in different programs). What a fixed max would buy is
the removal of one exp per block, paid for by a per-model calibrated threshold and a slow recompute path whenever a
head's scores exceed it (attention sinks and outlier heads make that common), and every row of a 64-token tree can
trigger it. With fp32 accumulators overflow is not a concern anyway, so we keep the exact online softmax.

Triton on CPU: set `TRITON_INTERPRET=1` before this module is imported (the @triton.jit decorators read it).
Ahead-of-time compilation for sm_90a without a GPU (registers, spills, shared memory): `medusa_toolkit.kernels.aot`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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

    def _jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


# Whether the kernels below were decorated in interpreter mode (decided once, at import).
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "sdpa", "torch")
# Trees the kernel takes: one 64-bit mask word per query row. Medusa trees have <= 64 nodes (mc_sim_7b_63: 64 with
# its root; the tuner's default budget is 64); larger ones go to SDPA under "auto" and are refused by "triton".
MAX_TREE_NODES = 64
LOG2E = 1.4426950408889634
_NUM_WARPS = 4
# Programs of the split kernel that one SM holds at once (registers and shared memory, from the sm_90a ptxas
# numbers); the AOT test asserts that every compiled variant reaches at least this occupancy.
PROGRAMS_PER_SM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 2}


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
    tree_row,
    stride_kn,
    stride_vn,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    HAS_TREE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N). Scores live in log2 units (exp2 is cheaper)."""
    n = start_n + offs_n
    k_ptrs = k_base + n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + n[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        n_ok = n < hi
        if EVEN_D:
            kt = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:  # a full prefix block: every key is valid and visible to every query row
        kt = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)

    if DOT_FP32:
        qk = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt)  # fp16/bf16 tensor cores, fp32 accumulate
    qk = qk * qk_scale

    if MASKED:
        j = n - prefix_end  # index of the key among the T new tokens (negative: prefix key)
        if HAS_TREE:
            # Bit j of a query row's packed tree mask: does it see new token j (T <= 64)? One [BLOCK_M] int64 load
            # (L1-resident: only the chunk's last blocks are masked) and a shift: no [BLOCK_M, BLOCK_N] byte gather
            # with 64-bit addresses, which pushed the 64-row tiles to 255 registers and spills on sm_90a.
            bits = tl.load(tree_row, mask=row_ok, other=0)
            shift = tl.where((j >= 0) & (j < 64), j, 0).to(tl.int64)
            allowed = (j[None, :] < 0) | (((bits[:, None] >> shift[None, :]) & 1) != 0)
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


# Sizes and flags change from call to call (S every decoding step): never specialise on their values, so one
# compiled variant per SplitKernelConfig serves every call (the ahead-of-time compile test relies on that).
@_jit(do_not_specialize=["stride_tb", "S", "T", "G", "H_KV", "num_splits", "has_kv_lens", "write_out"])
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
    S,
    T,
    G,
    H_KV,
    num_splits,
    has_kv_lens,
    write_out,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TREE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid (query-row block, split, batch * kv head). Rows are r = g * T + t: query head kv_head * G + g, token t.

    The row block is the fastest grid axis: the programs that read the same K/V chunk for different query rows run
    side by side and share it through L2 instead of streaming it from HBM once per row block.
    """
    m_block = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # int64: b * stride_kb overflows int32 on long caches
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
    # When the head dim fills the tile (64, 128) only rows are masked: no per-column predicates anywhere.
    if HEAD_DIM == BLOCK_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    tree_row = TREE + b * stride_tb + t_idx  # [BLOCK_M] pointers to each row's packed tree word

    kv_len = S
    if has_kv_lens != 0:
        # Clamped to [T, S]: a bad length gives a wrong answer (the host checks it), never an out-of-bounds read.
        kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), T), S)
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
            acc, m_i, l_i, q, k_base, v_base, start_n, hi, prefix_end, t_idx, row_ok, tree_row,
            stride_kn, stride_vn, qk_scale, offs_n, offs_d, d_ok,
            MASKED=False, HAS_TREE=HAS_TREE, DOT_FP32=DOT_FP32, EVEN_D=HEAD_DIM == BLOCK_D,
        )  # fmt: skip
    for start_n in range(unmasked_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, start_n, hi, prefix_end, t_idx, row_ok, tree_row,
            stride_kn, stride_vn, qk_scale, offs_n, offs_d, d_ok,
            MASKED=True, HAS_TREE=HAS_TREE, DOT_FP32=DOT_FP32, EVEN_D=HEAD_DIM == BLOCK_D,
        )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a split that saw only padding: output 0, lse -inf
    out = acc / l_safe[:, None]
    if write_out != 0:  # a single split (and no sinks) is already the final answer: no reduce kernel
        # Out is ours, contiguous [B, T, Hq, D] (what transformers continues with): a row offset, no strides.
        o_row = (b * T + t_idx) * (H_KV * G) + kvh * G + g
        tl.store(Out + o_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=io_mask)
    else:
        # Partials are [B * Hkv, num_splits, M, HEAD_DIM] (fp32) and lse [B * Hkv, num_splits, M] (log2 units).
        row = (bh * num_splits + split) * M + offs_m
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(LSE_PART + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)


@_jit(do_not_specialize=["T", "G", "H_KV", "num_splits", "has_sinks"])
def _flash_decode_reduce_kernel(
    O_PART,
    LSE_PART,
    SINKS,
    Out,
    T,
    G,
    H_KV,
    num_splits,
    has_sinks,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (row block, batch * kv head): out = sum_s 2^(lse_s - lse_max) * o_s / sum_s 2^(lse_s - lse_max).

    The [splits, rows] log-sum-exp tile is loaded at once (no chain of dependent loads per split), then the partial
    outputs in chunks of SPLIT_CHUNK splits, each chunk one wide load. An attention sink (gpt-oss) adds
    2^(sink - lse_max) to the denominator: a virtual key every query sees, with no value.
    """
    r_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H_KV
    kvh = bh % H_KV
    M = G * T
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < M
    d_ok = offs_d < HEAD_DIM
    g = offs_r // T
    t_idx = offs_r % T
    base = bh * num_splits * M

    # Pass 1: the max over splits, from [BLOCK_S, BLOCK_R] tiles of log-sum-exps (one tile up to BLOCK_S splits).
    lse_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = (s0 + offs_s < num_splits)[:, None] & row_ok[None, :]
        lse = tl.load(LSE_PART + base + (s0 + offs_s)[:, None] * M + offs_r[None, :], mask=s_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, 0))
    # No sinks: -inf, which changes neither the max nor (2^-inf = 0) the denominator below.
    sink_ok = row_ok & (g * 0 + has_sinks != 0)  # a tensor condition (the interpreter wants one)
    sink = tl.load(SINKS + kvh * G + g, mask=sink_ok, other=float("-inf")) * 1.4426950408889634
    lse_max = tl.maximum(lse_max, sink)
    # Splits holding only padding have lse = -inf and get weight 0; a row with no visible key at all gets output 0.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    # Pass 2: weights and partial outputs, SPLIT_CHUNK splits per [SPLIT_CHUNK, BLOCK_R, BLOCK_D] load.
    w_sum = tl.math.exp2(sink - lse_max)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        offs_c = s0 + tl.arange(0, SPLIT_CHUNK)
        c_ok = (offs_c < num_splits)[:, None] & row_ok[None, :]  # [CHUNK, BLOCK_R]
        lse_c = tl.load(LSE_PART + base + offs_c[:, None] * M + offs_r[None, :], mask=c_ok, other=float("-inf"))
        w_c = tl.math.exp2(lse_c - lse_max[None, :])
        w_sum += tl.sum(w_c, 0)
        part_ptrs = (
            O_PART + (base + offs_c[:, None, None] * M + offs_r[None, :, None]) * HEAD_DIM + offs_d[None, None, :]
        )
        part = tl.load(part_ptrs, mask=c_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [CHUNK, BLOCK_R, BLOCK_D]
        acc += tl.sum(w_c[:, :, None] * part, 0)
    out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]

    o_row = (b * T + t_idx) * (H_KV * G) + kvh * G + g  # Out is contiguous [B, T, Hq, D]
    tl.store(
        Out + o_row[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# --------------------------------------------------------------------------------------------------------------------
# Dispatcher: which compiled variant, how many splits
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitKernelConfig:
    """Everything the split kernel is specialised on (its constexprs, launch options and pointer dtypes)."""

    dtype: torch.dtype
    head_dim: int
    block_m: int
    block_n: int
    has_tree: bool  # False: causal among the new tokens
    dot_fp32: bool
    num_warps: int = _NUM_WARPS
    num_stages: int = 2

    @property
    def block_d(self) -> int:
        return 1 << (self.head_dim - 1).bit_length()


@dataclass(frozen=True)
class ReduceKernelConfig:
    """Everything the reduce kernel is specialised on."""

    dtype: torch.dtype
    head_dim: int
    block_r: int
    block_s: int
    split_chunk: int
    num_warps: int = _NUM_WARPS

    @property
    def block_d(self) -> int:
        return 1 << (self.head_dim - 1).bit_length()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_block_n(block_n: int | None) -> None:
    """block_n must be a power of two >= 16: compiled 16-bit dots need K >= 16 (the interpreter accepts less)."""
    if block_n is None:
        return
    if not isinstance(block_n, int) or isinstance(block_n, bool) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot needs K >= 16), got {block_n!r}")


@functools.lru_cache(maxsize=256)
def split_kernel_config(
    dtype: torch.dtype,
    head_dim: int,
    rows: int,
    tree_size: int | None,
    block_n: int | None = None,
    interpret: bool = INTERPRET,
) -> SplitKernelConfig:
    """The split-kernel variant `flash_decode` launches for M = `rows` query rows (G x T) and a tree of `tree_size`
    nodes (None: causal). The single source of truth for the AOT compile test and the GPU check.

    Compiled tiles (sm_90a, ptxas numbers in benchmarks/RESULTS.md; none spills):
      16-bit, M <= 16 (plain decoding): 16 x 64 keys, 2 stages, 4 warps.
      16-bit, M > 16 (trees): 64 x 32 keys, 3 stages, 4 warps. 64 x 64 reached 255 registers and spilled.
      fp32: 16 or 32 rows x 16 keys, 8 warps: fp32 dots run on FMA units ("ieee": exact, not tf32) and hold their
      operands in registers; 4 warps, or tiles of 32+ keys, spilled hundreds of bytes per thread.
    `block_n` lowers the keys per tile (a power of two >= 16); it cannot raise it past these.
    """
    check_block_n(block_n)
    has_tree = tree_size is not None
    if interpret:
        # The interpreter runs one numpy op per tile, so it prefers big tiles; its tl.dot is wrong on fp16/bf16.
        return SplitKernelConfig(dtype, head_dim, max(16, min(_next_pow2(rows), 128)), block_n or 128, has_tree, True)
    if dtype == torch.float32:
        block_m, tile_n, warps, stages = (16 if rows <= 16 else 32), 16, 8, 2
    elif rows <= 16:  # tl.dot needs >= 16 rows
        block_m, tile_n, warps, stages = 16, 64, 4, 2
    else:
        block_m, tile_n, warps, stages = 64, 32, 4, 3
    return SplitKernelConfig(
        dtype, head_dim, block_m, min(block_n or tile_n, tile_n), has_tree, dtype == torch.float32, warps, stages
    )


def reduce_kernel_config(dtype: torch.dtype, head_dim: int, interpret: bool = INTERPRET) -> ReduceKernelConfig:
    """The reduce-kernel variant: one per dtype and head dim, for every split count (more than BLOCK_S splits take a
    second tile) and with or without attention sinks (a runtime flag)."""
    if interpret:
        return ReduceKernelConfig(dtype, head_dim, 64, 64, 64)
    # [SPLIT_CHUNK, BLOCK_R, BLOCK_D] fp32 loads of 8 x 4 x 128 = 32 registers per thread: 8 splits in flight.
    return ReduceKernelConfig(dtype, head_dim, 4, 64, 8)


# Cost model of `default_num_splits`, in bytes moved at one SM's share of the memory bandwidth (~23 GB/s on an H100).
# Leads, not measurements: benchmarks/gpu_check.py sweeps num_splits on a GPU to check the choice.
_PROGRAM_RATE = 0.75  # share of its SM's bandwidth one resident program reaches alone (latency-bound)
_PROGRAM_FIXED_BYTES = 48 * 1024  # ~2 us: loading q, filling the pipeline, writing out
_REDUCE_LAUNCH_BYTES = 64 * 1024  # a second launch: ~2-3 us
_L2_REREAD = 0.25  # cost of re-reading a K/V tile from L2 relative to HBM


@functools.lru_cache(maxsize=4096)
def default_num_splits(
    batch: int,
    kv_heads: int,
    seq_len: int,
    m_blocks: int,
    num_sms: int,
    *,
    rows: int = 1,
    head_dim: int = 128,
    elem_bytes: int = 2,
    block_n: int = 64,
    programs_per_sm: int = 2,
    max_splits: int = 128,
) -> int:
    """How many chunks to cut each row's keys into: the count with the lowest estimated time.

    `batch * kv_heads * m_blocks` programs exist without splitting. Splitting by s multiplies them by s and divides
    each one's keys by s, but every split writes a [rows, head_dim] fp32 partial that the reduce kernel reads again,
    and a split count > 1 costs a second launch. The estimate, in bytes at one SM's share of the bandwidth:
      split kernel: the busiest SM runs ceil(programs / num_sms) programs, min(that, programs_per_sm) of them at
        once, each alone reaching _PROGRAM_RATE of the SM's share; a program moves its keys' K/V (the m_blocks row
        blocks of a chunk share it through L2), its partial and a fixed cost; and never faster than the whole
        kernel's HBM bytes (K/V once, partials written) over all SMs;
      reduce kernel: the partials read back, over all SMs, plus a launch.
    So the partials of a 64-token tree (rows = G * T = 256) keep its split count low, a count that overshoots the SMs
    by a few programs (a tail wave) loses to one that fills them exactly, and occupancy (programs_per_sm) says how
    many programs per SM still pay. Candidates: 1 and the counts that fill the SMs with a whole number of programs
    each (more splits within the same load only add partials), each rounded to the splits that actually hold keys.
    Examples on an H100 (132 SMs), 8 kv heads, bf16, D=128, the dispatcher's tiles: B=1, T=1, S=128k -> 33 splits
    (264 programs, 2 per SM); B=1, T=1, S=32k -> 32; B=1, T=64, G=4, S=4k -> 4 (partials half the K/V bytes);
    B=1, T=64, S=32k -> 8; B=8, T=1, S=4k -> 4; B=8, T=64, S=32k -> 1; B=32, T=1 -> 1.
    The constants are leads: `benchmarks/gpu_check.py` times forced split counts against this choice on a GPU.
    """
    base = batch * kv_heads * m_blocks
    kv_bytes = 2 * head_dim * elem_bytes  # one key's K and V
    block_rows = -(-rows // m_blocks)
    blocks = max(1, -(-seq_len // block_n))
    limit = max(1, min(max_splits, blocks))
    kv_total = batch * kv_heads * seq_len * kv_bytes
    # The m_blocks programs of one chunk run side by side (row block = fastest grid axis): one reads K/V from HBM,
    # the others mostly from L2.
    l2 = (1 + (m_blocks - 1) * _L2_REREAD) / m_blocks
    candidates = {1} | {n * num_sms // base for n in range(1, limit * base // num_sms + 2)}
    best, best_cost = 1, float("inf")
    for s in sorted(c for c in candidates if 1 <= c <= limit):
        per_split = -(-blocks // s)  # a chunk is whole blocks ...
        s = -(-blocks // per_split)  # ... so this many splits hold keys (the rest would run empty)
        programs = base * s
        on_sm = -(-programs // num_sms)
        rate = min(1.0, min(on_sm, programs_per_sm) * _PROGRAM_RATE)
        partial = block_rows * head_dim * 4 if s > 1 else 0
        split_time = max(
            on_sm * (per_split * block_n * kv_bytes * l2 + partial + _PROGRAM_FIXED_BYTES) / rate,
            (kv_total + base * s * partial) / num_sms,  # HBM: K/V once, the partials written
        )
        reduce_time = (base * s * partial) / num_sms + _REDUCE_LAUNCH_BYTES if s > 1 else 0.0
        cost = split_time + reduce_time
        if cost < best_cost * 0.999:  # ties go to fewer splits (less partial traffic, fewer rounding steps)
            best, best_cost = s, cost
    return best


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedTreeMask:
    """A tree mask packed for the kernel: `bits` int64 [T] or [B, T], bit j of row i set iff new token i sees new
    token j (T <= MAX_TREE_NODES); `mask` is the bool [T, T] / [B, T, T] it came from (what the dense paths use)."""

    mask: torch.Tensor
    bits: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape


def pack_tree_mask(tree_mask: torch.Tensor | PackedTreeMask) -> PackedTreeMask:
    """Pack a bool tree mask [T, T] or [B, T, T] (T <= 64) into one int64 word per row (a few tiny device ops).

    `flash_decode` packs its `tree_mask` on every call; a caller that runs the same tree through many layers (the
    transformers integration does) packs once and passes the PackedTreeMask instead.
    """
    if isinstance(tree_mask, PackedTreeMask):
        return tree_mask
    T = tree_mask.shape[-1]
    if T > MAX_TREE_NODES:
        raise ValueError(f"a packed tree mask holds up to {MAX_TREE_NODES} nodes, got {T}")
    # 1 << 63 is int64's minimum: the sum wraps in two's complement, which is exactly the wanted bit pattern.
    one = torch.ones((), dtype=torch.int64, device=tree_mask.device)
    weights = one << torch.arange(T, dtype=torch.int64, device=tree_mask.device)
    return PackedTreeMask(tree_mask, (tree_mask.to(torch.int64) * weights).sum(-1).contiguous())


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    num_splits: int | None,
    backend: str,
    check_kv_lens_values: bool,
    sinks: torch.Tensor | None = None,
    block_n: int | None = None,
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
        mask = tree_mask.mask if isinstance(tree_mask, PackedTreeMask) else tree_mask
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"tree_mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"tree_mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) not in ((T, T), (B, T, T)):
            raise ValueError(f"tree_mask must be [T, T] or [B, T, T] with T={T}, B={B}; got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"tree_mask is on {mask.device}, q on {q.device}")
    if kv_lens is not None:
        if kv_lens.dtype.is_floating_point or kv_lens.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"kv_lens must be an integer tensor, got {kv_lens.dtype}")
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens must have shape [B] = [{B}], got {tuple(kv_lens.shape)}")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens is on {kv_lens.device}, q on {q.device}")
        if check_kv_lens_values:  # one device sync; callers in a hot loop check once per step (hf_attention does)
            lo, hi = torch.stack(torch.aminmax(kv_lens)).tolist()
            if lo < T:
                raise ValueError(f"kv_lens must be >= T={T} (the cache holds the new tokens), got min {lo}")
            if hi > S:
                raise ValueError(f"kv_lens must be <= S={S} (the cache length), got max {hi}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (Hq,) or not sinks.dtype.is_floating_point:
            raise ValueError(f"sinks must be a float tensor [Hq] = [{Hq}], got {getattr(sinks, 'shape', sinks)!r}")
        if sinks.device != q.device:
            raise ValueError(f"sinks are on {sinks.device}, q on {q.device}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    check_block_n(block_n)


def dense_attention_mask(
    T: int,
    S: int,
    tree_mask: torch.Tensor | PackedTreeMask | None = None,
    kv_lens: torch.Tensor | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Expand the compact (tree_mask, kv_lens) description into a dense bool mask [B, T, S] (True = attend).

    Row b's new tokens are keys [kv_lens[b] - T, kv_lens[b]); keys before them are the prefix (visible to all new
    tokens), keys at or after kv_lens[b] are padding. `tree_mask` None means causal among the new tokens.
    """
    if isinstance(tree_mask, PackedTreeMask):
        tree_mask = tree_mask.mask
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
    tree_mask: torch.Tensor | PackedTreeMask | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Readable torch implementation of `flash_decode` (no input checks): dense fp32 masked softmax.

    GQA is handled like the kernel does it, by viewing the Hq/Hkv query heads of a kv head as extra query rows.
    Rows with no visible key return 0 (the kernel's convention) rather than NaN. `sinks` [Hq]: a per-head logit that
    joins every row's softmax denominator (gpt-oss attention sinks), with no value.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    allowed = dense_attention_mask(T, S, tree_mask, kv_lens, batch=B, device=q.device)  # [B, T, S]

    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*T, S]
    scores = scores.view(B, Hkv, G, T, S).masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, T, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S].nan_to_num(0.0)
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    # Padding may hold garbage (even NaN, e.g. from torch.empty): 0 * NaN would leak into the sum, so zero it.
    v = v.float().masked_fill(~allowed.any(dim=1)[:, None, :, None], 0.0)
    out = probs.reshape(B, Hkv, G * T, S) @ v
    return out.view(B, Hq, T, D).to(q.dtype)


def _flash_decode_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | PackedTreeMask | None,
    kv_lens: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """torch SDPA with the dense [B, 1, T, S] mask: the CUDA fallback for what the kernel does not compile."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    allowed = dense_attention_mask(T, S, tree_mask, kv_lens, batch=B, device=q.device)[:, None]
    if kv_lens is not None:
        # Padding may hold garbage (NaN from torch.empty): a zero weight times NaN is NaN inside SDPA's matmul.
        valid = allowed.any(dim=2, keepdim=True).transpose(2, 3)  # [B, 1, S, 1]
        k, v = k.masked_fill(~valid, 0.0), v.masked_fill(~valid, 0.0)
    if Hq != Hkv:
        k, v = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _flash_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | PackedTreeMask | None,
    kv_lens: torch.Tensor | None,
    scale: float,
    num_splits: int | None,
    block_n: int | None,
    sinks: torch.Tensor | None,
    config: SplitKernelConfig | None = None,
) -> torch.Tensor:
    """The Triton path of `flash_decode` (inputs already checked). `config` overrides the dispatcher's tiles (the
    GPU check's tile sweep uses it)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    M = G * T
    # What the kernel cannot do is a usage error on every machine, so it is checked before the device is.
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"backend='triton' supports head dims {SUPPORTED_HEAD_DIMS}, got {D} (use backend='sdpa' or 'torch')"
        )
    if tree_mask is not None and T > MAX_TREE_NODES:
        raise ValueError(
            f"backend='triton' takes trees of up to {MAX_TREE_NODES} nodes, got {T} (use backend='sdpa' or 'auto')"
        )
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (use backend='torch' or 'auto')")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "medusa_toolkit.kernels (or use backend='torch'/'auto')"
        )
    # The kernels assume a unit stride along the head dim (true for HF's q/k/v); anything else is copied once.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))

    cfg = config or split_kernel_config(q.dtype, D, M, None if tree_mask is None else T, block_n)
    m_blocks = -(-M // cfg.block_m)
    if num_splits is None:
        num_splits = default_num_splits(
            B, Hkv, S, m_blocks, _num_sms(q.device.index or 0) if q.is_cuda else 8,
            rows=M, head_dim=D, elem_bytes=q.element_size(), block_n=cfg.block_n,
            programs_per_sm=PROGRAMS_PER_SM[q.dtype],
        )  # fmt: skip
    write_out = num_splits == 1 and sinks is None

    # Stored [B, T, Hq, D], returned as the [B, Hq, T, D] view: transformers wants [B, T, Hq, D] next, for free.
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if write_out:
        o_part = lse_part = _dummy(q.device, torch.float32)  # unused: the split kernel writes `out` directly
    else:
        # One allocation for both partial buffers (fp32): O [B*Hkv, splits, M, D] then LSE [B*Hkv, splits, M].
        n_o = B * Hkv * num_splits * M * D
        part = torch.empty(n_o + B * Hkv * num_splits * M, dtype=torch.float32, device=q.device)
        o_part, lse_part = part[:n_o], part[n_o:]
    if tree_mask is not None:
        bits = pack_tree_mask(tree_mask).bits  # [(B,) T] contiguous
        stride_tb = bits.stride(0) if bits.dim() == 2 else 0  # [T] is shared by the whole batch
    else:
        bits, stride_tb = _dummy(q.device, torch.int64), 0  # never read (HAS_TREE=False)
    # int64 is what decoding loops hold (torch's default integer): passed as is, no per-call conversion kernel.
    # Dummies keep every pointer's dtype fixed, so a missing tree or kv_lens is no extra compiled variant.
    if kv_lens is None:
        lens = _dummy(q.device, torch.int64)
    else:
        lens = kv_lens if kv_lens.dtype == torch.int64 and kv_lens.is_contiguous() else kv_lens.long().contiguous()
    if sinks is not None and sinks.dtype != torch.float32:
        sinks = sinks.float()

    with _on_device(q.device):
        _flash_decode_split_kernel[(m_blocks, num_splits, B * Hkv)](
            q, k, v, bits, lens, out, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            stride_tb,
            S, T, G, Hkv, num_splits, int(kv_lens is not None), int(write_out), scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            HAS_TREE=cfg.has_tree, DOT_FP32=cfg.dot_fp32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if not write_out:
            rc = reduce_kernel_config(q.dtype, D)
            _flash_decode_reduce_kernel[(-(-M // rc.block_r), B * Hkv)](
                o_part, lse_part, _dummy(q.device, torch.float32) if sinks is None else sinks, out,
                T, G, Hkv, num_splits, int(sinks is not None),
                HEAD_DIM=D, BLOCK_R=rc.block_r, BLOCK_S=rc.block_s, SPLIT_CHUNK=rc.split_chunk, BLOCK_D=rc.block_d,
                num_warps=rc.num_warps,
            )  # fmt: skip
    return out


_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor standing in for an absent input (never read), cached per device and dtype."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


class _on_device:
    """Triton launches on the current CUDA device: switch to q's device only when it is another one."""

    def __init__(self, device: torch.device):
        self.ctx = None
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(device)

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def resolve_backend(backend: str, q: torch.Tensor, tree_size: int | None = None, has_sinks: bool = False) -> str:
    """'auto' -> 'triton' for CUDA tensors the kernel compiles for; other CUDA tensors (head dims outside
    SUPPORTED_HEAD_DIMS, trees over MAX_TREE_NODES) 'sdpa', or 'torch' when attention sinks are given, which SDPA
    lacks; 'torch' off CUDA. Other names pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "torch"
    if HAS_TRITON and q.shape[-1] in SUPPORTED_HEAD_DIMS and (tree_size is None or tree_size <= MAX_TREE_NODES):
        return "triton"
    return "torch" if has_sinks else "sdpa"


def flash_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | PackedTreeMask | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
    *,
    block_n: int | None = None,
    check_kv_lens: bool = True,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of T new tokens over a KV cache that already contains them (Flash-Decoding).

    Args:
        q: [B, Hq, T, D] queries of the new tokens (T = 1 for plain decoding, the tree size for verification).
        k, v: [B, Hkv, S, D] the whole cache, the new tokens being the last T valid positions; Hq % Hkv == 0. Any
            strides with a unit stride along D (a slice of a larger cache buffer is fine).
        tree_mask: bool [T, T] or [B, T, T] (or a `pack_tree_mask` result); new token i sees new token j iff
            tree_mask[i, j] (and every prefix key). None: causal among the new tokens.
        kv_lens: int [B], valid keys of row b are [0, kv_lens[b]) (T <= kv_lens[b] <= S); the rest is padding.
            None: all S keys are valid.
        scale: softmax scale, default D ** -0.5.
        num_splits: key chunks per row processed in parallel (triton only); None picks `default_num_splits`.
        backend: "triton", "sdpa" (torch SDPA with the dense mask), "torch" (dense fp32 reference) or "auto" (triton
            on CUDA where it compiles, else sdpa; torch off CUDA).
        block_n: keys per tile of the triton kernel (also the split granularity), a power of two >= 16; None picks
            a default. Compiled kernels cap it at 64 (larger tiles overflow shared memory).
        check_kv_lens: verify T <= kv_lens <= S (costs one device sync).
        sinks: float [Hq], per-head attention-sink logits (gpt-oss's `s_aux`): each row's softmax denominator gets
            exp(sink) more, with no value. Not with backend="sdpa".

    Returns:
        [B, Hq, T, D] in q's dtype, accumulated in fp32. The triton backend returns a view of a [B, T, Hq, D] tensor
        (the layout transformers continues with). fp32/fp16/bf16; triton supports head dims 64, 80, 96, 128.
    """
    _check_inputs(q, k, v, tree_mask, kv_lens, num_splits, backend, check_kv_lens, sinks, block_n)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    resolved = resolve_backend(backend, q, None if tree_mask is None else q.shape[2], sinks is not None)
    if resolved == "triton":
        return _flash_decode_triton(q, k, v, tree_mask, kv_lens, scale, num_splits, block_n, sinks)
    if resolved == "sdpa":
        if sinks is not None:
            raise ValueError("backend='sdpa' has no attention sinks: use backend='torch' or 'triton'")
        return _flash_decode_sdpa(q, k, v, tree_mask, kv_lens, scale)
    return flash_decode_reference(q, k, v, tree_mask, kv_lens, scale, sinks)
