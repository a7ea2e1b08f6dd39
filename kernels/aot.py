"""Compile the Flash-Decoding kernels ahead of time for a GPU target, without a GPU: registers, spills, shared memory.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's whole pipeline down to a cubin on any
machine; the `ptxas` inside the triton wheel (`-arch=sm_90a -v`) then reports registers and spill bytes per thread,
and Triton's metadata the dynamic shared memory of a program. `dispatcher_variants()` lists every kernel variant
`flash_decode` can launch (it asks the dispatcher itself, `split_kernel_config` / `reduce_kernel_config`, over the
whole input space), so the compile test covers exactly what runs.

    python -m medusa_toolkit.kernels.aot                 # every variant for sm_90a, a table (about a minute)
    python -m medusa_toolkit.kernels.aot --json out.json --jobs 2

The kernels must be real `triton.jit` functions, not the interpreter's: in a process where TRITON_INTERPRET=1 was
set before the kernels were imported (the CPU test suite), `compile_variants` runs the compiles in a fresh Python
process without it. Triton's cache goes to a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from .flash_decode import (
    MAX_TREE_NODES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    ReduceKernelConfig,
    SplitKernelConfig,
    reduce_kernel_config,
    split_kernel_config,
)

# H100 / H200 (sm_90) per-SM limits, from NVIDIA's CUDA occupancy tables.
SM90_SMEM_PER_BLOCK = 227 * 1024  # the most one program may ask for
SM90_SMEM_PER_SM = 228 * 1024
SM90_SMEM_RESERVED_PER_BLOCK = 1024
SM90_REGS_PER_SM = 65536
SM90_REG_ALLOC_UNIT = 256  # registers are granted per warp in units of 256
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32

WRITE_OUT = False
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class CompileResult:
    """One compiled variant: what it is and what ptxas / Triton reported for it."""

    kernel: str  # "split" or "reduce"
    dtype: str
    head_dim: int
    block_m: int  # split: query rows per program; reduce: rows per program (BLOCK_R)
    block_n: int  # split: keys per tile; reduce: splits per chunk
    flag: int  # split: 1 = tree mask, 0 = causal
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared_mem: int  # bytes of (dynamic) shared memory per program
    compile_s: float

    @property
    def programs_per_sm(self) -> int:
        return occupancy(self.registers, self.shared_mem, self.num_warps)

    @property
    def label(self) -> str:
        if self.kernel == "split":
            tree = "tree" if self.flag else "causal"
            return f"split {self.dtype} D={self.head_dim} M={self.block_m} N={self.block_n} {tree}"
        return f"reduce {self.dtype} D={self.head_dim} R={self.block_m} C={self.block_n}"


def occupancy(registers: int, shared_mem: int, num_warps: int) -> int:
    """Programs of this size one sm_90 SM holds at once (registers, shared memory, warps, blocks)."""
    regs_per_warp = -(-registers * 32 // SM90_REG_ALLOC_UNIT) * SM90_REG_ALLOC_UNIT
    by_regs = (SM90_REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else SM90_MAX_BLOCKS
    by_smem = SM90_SMEM_PER_SM // (shared_mem + SM90_SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_smem, SM90_MAX_WARPS // num_warps, SM90_MAX_BLOCKS)


def dispatcher_variants(
    dtypes: tuple = SUPPORTED_DTYPES, head_dims: tuple = SUPPORTED_HEAD_DIMS
) -> list[SplitKernelConfig | ReduceKernelConfig]:
    """Every compiled variant `flash_decode` can launch on a GPU with default tiles, asked of the dispatcher.

    Sweeps what the variants depend on: dtype x head dim x query rows M = G * T (1..1024) x tree size (none, 1..MAX_TREE_NODES)
    for the split kernel; dtype x head dim for the reduce kernel. kv_lens, attention sinks, S, T, G, the batch and
    the split count are runtime arguments (no variant of their own).
    """
    found: dict = {}
    rows_grid = sorted({1, 2, 4, 8, 15, 16, 17, 24, 32, 33, 48, 64, 65, 96, 128, 256, 512, 1024})
    tree_grid = [None, 1, 2, 16, 63, MAX_TREE_NODES]
    for dtype in dtypes:
        for d in head_dims:
            for tree in tree_grid:
                for rows in rows_grid:
                    if tree is not None and rows < tree:
                        continue  # M = G * T >= T
                    cfg = split_kernel_config(dtype, d, rows, tree, interpret=False)
                    found[cfg] = None
            found[reduce_kernel_config(dtype, d, interpret=False)] = None
    return list(found)


def _signature(kernel, types: dict, constexprs: dict, aligned: set) -> tuple[dict, dict, dict]:
    """ASTSource arguments: types by parameter name (constexprs named), 16-divisibility on the given parameters,
    which is what Triton's runtime specialisation gives contiguous tensors with head dims that are multiples of 16."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in constexprs else types[name]
        if name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _split_source(cfg: SplitKernelConfig, kernel):
    from triton.compiler import ASTSource

    ptr = "*" + _TRITON_DTYPE[cfg.dtype]
    types = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "TREE": "*i64", "KV_LENS": "*i64"}
    types |= {"O_PART": "*fp32", "LSE_PART": "*fp32", "qk_scale": "fp32"}
    for name in kernel.arg_names:
        types.setdefault(name, "i32")
    constexprs = {
        "HEAD_DIM": cfg.head_dim,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_D": cfg.block_d,
        "HAS_TREE": cfg.has_tree,
        "DOT_FP32": cfg.dot_fp32,
    }
    strides = {n for n in kernel.arg_names if n.startswith("stride_") and n != "stride_tb"}
    aligned = {"Q", "K", "V", "Out", "TREE", "KV_LENS", "O_PART", "LSE_PART"} | strides
    return ASTSource(kernel, *_signature(kernel, types, constexprs, aligned))


def _reduce_source(cfg: ReduceKernelConfig, kernel):
    from triton.compiler import ASTSource

    ptr = "*" + _TRITON_DTYPE[cfg.dtype]
    types = {"O_PART": "*fp32", "LSE_PART": "*fp32", "SINKS": "*fp32", "Out": ptr}
    for name in kernel.arg_names:
        types.setdefault(name, "i32")
    constexprs = {
        "HEAD_DIM": cfg.head_dim,
        "BLOCK_R": cfg.block_r,
        "BLOCK_S": cfg.block_s,
        "SPLIT_CHUNK": cfg.split_chunk,
        "BLOCK_D": cfg.block_d,
    }
    aligned = {"O_PART", "LSE_PART", "SINKS", "Out"}
    return ASTSource(kernel, *_signature(kernel, types, constexprs, aligned))


def ptxas_path() -> str | None:
    """The ptxas Triton itself uses for sm_90 (inside the wheel), or None when this triton has none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception:  # an older triton: the classic location
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def parse_ptxas(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_one(cfg: SplitKernelConfig | ReduceKernelConfig, arch: int = 90) -> CompileResult:
    """Compile one variant for sm_{arch}a in this process (its kernels must be triton.jit functions)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fd = _kernels_module()
    split = isinstance(cfg, SplitKernelConfig)
    kernel = fd._flash_decode_split_kernel if split else fd._flash_decode_reduce_kernel
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were decorated for the interpreter: compile in a process without it")
    source = _split_source(cfg, kernel) if split else _reduce_source(cfg, kernel)
    options = {"num_warps": cfg.num_warps}
    if split:
        options["num_stages"] = cfg.num_stages
    # Triton runs ptxas itself (with its own flags, which change the allocation: --regAllocOptLevel=2 on recent
    # versions); its -v log is what we read, printed when TRITON_DUMP_PTXAS_LOG is on.
    log = io.StringIO()
    start = time.perf_counter()
    with _ptxas_log_on(), contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    elapsed = time.perf_counter() - start
    log = log.getvalue()
    if "Used" not in log:  # a triton without the knob: run the wheel's ptxas the way triton 3.9 does
        log = _run_ptxas(compiled.asm["ptx"], arch)
    regs, spill_st, spill_ld = parse_ptxas(log)
    return CompileResult(
        kernel="split" if split else "reduce",
        dtype=_DTYPE_NAME[cfg.dtype],
        head_dim=cfg.head_dim,
        block_m=cfg.block_m if split else cfg.block_r,
        block_n=cfg.block_n if split else cfg.split_chunk,
        flag=int(cfg.has_tree) if split else 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages if split else 1,
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared_mem=int(compiled.metadata.shared),
        compile_s=round(elapsed, 2),
    )


def _kernels_module():
    """The flash_decode module (the package's `flash_decode` attribute is the function of that name)."""
    return importlib.import_module(__package__ + ".flash_decode")


class _ptxas_log_on:
    """Set triton's dump_ptxas_log knob (TRITON_DUMP_PTXAS_LOG) for the duration of a compile."""

    def __enter__(self) -> None:
        self.env = os.environ.get("TRITON_DUMP_PTXAS_LOG")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            from triton import knobs

            self.knob = knobs.nvidia.dump_ptxas_log
            knobs.nvidia.dump_ptxas_log = True
        except (ImportError, AttributeError):
            self.knob = None

    def __exit__(self, *exc) -> None:
        if self.env is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = self.env
        if self.knob is not None:
            from triton import knobs

            knobs.nvidia.dump_ptxas_log = self.knob


def _run_ptxas(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a", path]
        run = subprocess.run(cmd + ["-o", path + ".o"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{run.stderr}")
    return run.stderr + run.stdout


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_in_this_process(configs: list, jobs: int) -> list[CompileResult]:
    with tempfile.TemporaryDirectory(prefix="medusa-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            return [compile_one(c) for c in configs]
        # Longest first, so that the big split variants do not end up alone in the last wave.
        order = sorted(range(len(configs)), key=lambda i: isinstance(configs[i], ReduceKernelConfig))
        with ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=(cache,)) as pool:
            done = list(pool.map(compile_one, [configs[i] for i in order]))
        results: list = [None] * len(configs)
        for i, r in zip(order, done):
            results[i] = r
        return results


def compile_variants(
    configs: list[SplitKernelConfig | ReduceKernelConfig] | None = None, jobs: int = 1, timeout: float = 900
) -> list[CompileResult]:
    """Compile `configs` (default: every dispatcher variant) for sm_90a; one CompileResult each, in order.

    Runs in this process (forking `jobs` workers) when its kernels are triton.jit functions and CUDA is not
    initialised here; else in a fresh `python -m medusa_toolkit.kernels.aot` with TRITON_INTERPRET removed from its
    environment (interpreted kernels cannot be compiled, and a process that has touched CUDA must not fork).
    """
    fd = _kernels_module()
    configs = dispatcher_variants() if configs is None else configs
    if not fd.INTERPRET and not torch.cuda.is_initialized():
        return _compile_in_this_process(configs, jobs)
    with tempfile.TemporaryDirectory(prefix="medusa-aot-") as tmp:
        request = os.path.join(tmp, "request.json")
        answer = os.path.join(tmp, "answer.json")
        with open(request, "w") as f:
            json.dump([_config_to_json(c) for c in configs], f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # cwd=tmp: from the repository root, `python -m` would put the root, and so our kernels/ folder, on
        # sys.path, where transformers' probe for Hugging Face's `kernels` package would find it.
        run = subprocess.run(
            [sys.executable, "-m", "medusa_toolkit.kernels.aot", "--request", request, "--json", answer]
            + ["--jobs", str(jobs), "--quiet"],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if run.returncode != 0:
            raise RuntimeError(f"ahead-of-time compile failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
        with open(answer) as f:
            return [CompileResult(**r) for r in json.load(f)["results"]]


def _config_to_json(cfg: SplitKernelConfig | ReduceKernelConfig) -> dict:
    d = asdict(cfg)
    d["dtype"] = _DTYPE_NAME[cfg.dtype]
    d["kind"] = "split" if isinstance(cfg, SplitKernelConfig) else "reduce"
    return d


def _config_from_json(d: dict) -> SplitKernelConfig | ReduceKernelConfig:
    d = dict(d)
    kind = d.pop("kind")
    d["dtype"] = {v: k for k, v in _DTYPE_NAME.items()}[d["dtype"]]
    return SplitKernelConfig(**d) if kind == "split" else ReduceKernelConfig(**d)


def format_table(results: list[CompileResult]) -> str:
    """One line per variant: registers, spills, shared memory, programs per SM."""
    lines = [f"{'variant':<46} {'regs':>4} {'spill st/ld':>11} {'smem KB':>7} {'prog/SM':>7} {'compile':>7}"]
    for r in results:
        lines.append(
            f"{r.label:<46} {r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':>11} "
            f"{r.shared_mem / 1024:>7.1f} {r.programs_per_sm:>7} {r.compile_s:>6.1f}s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--request", help=argparse.SUPPRESS)  # configs as JSON (compile_variants' subprocess)
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = p.parse_args(argv)
    if ptxas_path() is None:
        print("this triton wheel ships no ptxas: nothing to compile against", file=sys.stderr)
        return 3
    if args.request:
        with open(args.request) as f:
            configs = [_config_from_json(d) for d in json.load(f)]
    else:
        configs = dispatcher_variants()
    start = time.perf_counter()
    results = compile_variants(configs, jobs=args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90a", "results": [asdict(r) for r in results]}, f, indent=1)
    if not args.quiet:
        print(format_table(results))
        print(f"{len(results)} variants compiled for sm_90a in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
