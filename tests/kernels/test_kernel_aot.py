"""The Flash-Decoding kernels compiled ahead of time for the H100/H200 (sm_90a) on this CPU: every variant the
dispatcher can launch compiles, none spills registers, each fits the shared memory of an SM and reaches the occupancy
that the split heuristic assumes. Runs on any machine (no GPU): Triton compiles for an explicit target, and the
ptxas inside the triton wheel reports registers and spills (medusa_toolkit.kernels.aot)."""

import pytest
import torch

from medusa_toolkit.kernels.aot import (
    SM90_SMEM_PER_BLOCK,
    CompileResult,
    compile_variants,
    dispatcher_variants,
    format_table,
    occupancy,
    parse_ptxas,
    ptxas_path,
)
from medusa_toolkit.kernels.flash_decode import (
    PROGRAMS_PER_SM,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    ReduceKernelConfig,
    SplitKernelConfig,
    reduce_kernel_config,
    split_kernel_config,
)

try:
    import triton  # noqa: F401

    PTXAS = ptxas_path()
    WHY = "this triton wheel ships no ptxas (triton/backends/nvidia/bin/): nothing to compile sm_90a code with"
except ImportError:
    PTXAS, WHY = None, "triton is not installed"

needs_ptxas = pytest.mark.skipif(PTXAS is None, reason=WHY)
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every dispatcher variant, compiled once for sm_90a (two compile processes)."""
    variants = dispatcher_variants()
    results = compile_variants(variants, jobs=2)
    print("\n" + format_table(results))
    return dict(zip(variants, results))


def test_dispatcher_variants_cover_the_input_space():
    variants = dispatcher_variants()
    # What flash_decode launches for plain decoding (T=1) and trees (T=16, 64) with GQA groups of 1, 4 and 8.
    for dtype in SUPPORTED_DTYPES:
        for d in SUPPORTED_HEAD_DIMS:
            for T in (1, 16, 64):
                for G in (1, 4, 8):
                    for tree in (None, T) if T > 1 else (None,):
                        assert split_kernel_config(dtype, d, G * T, tree, interpret=False) in variants
            assert reduce_kernel_config(dtype, d, interpret=False) in variants
    # dtype x head dim x {causal, tree} x {decode tile, tree tile} + a reduce per dtype x head dim; kv_lens, sinks,
    # S, T, G and the split count are runtime arguments.
    assert len(variants) == len(SUPPORTED_DTYPES) * len(SUPPORTED_HEAD_DIMS) * (2 * 2 + 1)


def test_ptxas_report_and_occupancy_math():
    log = (
        "ptxas info    : Function properties for _flash_decode_split_kernel\n"
        "    16 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 16 bytes cumulative stack size\n"
    )
    assert parse_ptxas(log) == (96, 16, 24)
    with pytest.raises(RuntimeError, match="ptxas"):
        parse_ptxas("garbage")
    # 168 registers x 128 threads: 3 programs by registers; 80 KB of shared memory: 2 by shared memory.
    assert occupancy(168, 80 * 1024, 4) == 2
    assert occupancy(255, 0, 4) == 2 and occupancy(64, 0, 4) == 8 and occupancy(32, 0, 4) == 16


@needs_ptxas
@pytest.mark.slow
def test_every_variant_compiles_for_sm90a_without_spills(compiled):
    assert all(isinstance(r, CompileResult) and r.registers > 0 for r in compiled.values())
    spilled = [f"{r.label}: {r.spill_stores}/{r.spill_loads} B" for r in compiled.values() if r.spill_stores]
    assert not spilled, "register spills on sm_90a:\n" + "\n".join(spilled)
    too_big = [f"{r.label}: {r.shared_mem} B" for r in compiled.values() if r.shared_mem > SM90_SMEM_PER_BLOCK]
    assert not too_big, "over the H100's 227 KB of shared memory per program:\n" + "\n".join(too_big)


@needs_ptxas
@pytest.mark.slow
def test_16bit_decode_and_tree_tiles_do_not_spill(compiled):
    # The case: bf16/fp16 at T = 1, 16, 64 (the 64-row tree tile used to reach 255 registers and spill
    # 440 B per thread through the uint8 tree-mask gather).
    for dtype in (torch.float16, torch.bfloat16):
        for T in (1, 16, 64):
            cfg = split_kernel_config(dtype, 128, 4 * T, T if T > 1 else None, interpret=False)
            r = compiled[cfg]
            assert r.spill_stores == r.spill_loads == 0, r.label
            assert r.registers < 255, r.label  # not at the ceiling either


@needs_ptxas
@pytest.mark.slow
def test_occupancy_the_split_heuristic_assumes(compiled):
    # default_num_splits sizes the grid for PROGRAMS_PER_SM programs per SM: every split variant must fit that many.
    for cfg, r in compiled.items():
        if isinstance(cfg, SplitKernelConfig):
            assert r.programs_per_sm >= PROGRAMS_PER_SM[cfg.dtype], f"{r.label}: {r.programs_per_sm} per SM"
        else:
            assert isinstance(cfg, ReduceKernelConfig) and r.programs_per_sm >= 4, r.label
