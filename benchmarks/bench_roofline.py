"""The decoding step against this machine's roofline, eager and compiled, for tree sizes 1-32.

Prints the CPU (model, vector ISA, threads) and what it can do at best: its streaming bandwidth (one read of a
1 GiB fp32 tensor) and its sgemm peak (a 2048^3 fp32 product). Then, per tree size, side by side in one process:

  eager      the decoding step as decode_step runs it without compiling (median ms)
  compiled   the same step through decoding.compiled (inductor freezing + the C++ GEMM template)
  gemms      the step's GEMMs alone (every Linear of the base, lm_head included, at N rows), compiled the same way
  limit      what those GEMMs cannot beat: max(weight bytes / bandwidth, FLOPs / sgemm peak)
  rest       compiled step - gemms: attention, the heads (one row: the accepted node), the tree's bookkeeping

Step times are measured as the tree tuner measures them (tuning.timing.measure_step_times, KV length 256, the
profile trees it tunes from). Ratios are to the compiled one-token step: what a tree must beat.

    python benchmarks/bench_roofline.py                               # demo heads, SmolLM2-135M, fp32
    python benchmarks/bench_roofline.py --heads DIR --sizes 1 2 4 8 16 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from medusa_toolkit import MedusaHeads, MedusaModel, load_base_model
from medusa_toolkit.decoding import compiled
from medusa_toolkit.tuning.timing import measure_step_times, profile_trees

DEMO_HEADS = Path("runs/smollm2-135m/heads")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """'<model name>, <ISA flags>, <threads> threads' from /proc/cpuinfo (Linux), else what platform knows."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "unknown ISA"
    return f"{name}, {isa} (torch uses {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


def seconds(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_seconds(fn, repeats: int) -> float:
    return min(seconds(fn, repeats))


def streaming_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of one read of a large fp32 tensor (a sum: the read dominates, the arithmetic is free)."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / best_seconds(lambda: x.sum(), repeats)


def sgemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size^3 fp32 product (ATen's BLAS, all threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats)


class StepGemms(torch.nn.Module):
    """Every GEMM of a decoding step's base forward at N rows (the Linear layers, lm_head included), each on its own
    input, so their time can be set against the bandwidth limit alone. The heads run on one row per step whatever
    the tree (the node that ends the accepted path), so they belong to the rest."""

    def __init__(self, model: MedusaModel):
        super().__init__()
        linears = [m for m in model.base.modules() if isinstance(m, torch.nn.Linear)]
        if model.base.get_output_embeddings() not in linears:
            linears.append(model.base.get_output_embeddings())
        self.linears = torch.nn.ModuleList(linears)

    def forward(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [lin(inputs[str(lin.in_features)]) for lin in self.linears]

    def inputs(self, rows: int) -> dict[str, torch.Tensor]:
        widths = {lin.in_features for lin in self.linears}
        return {str(w): torch.randn(rows, w) for w in widths}

    def weight_bytes(self) -> int:
        seen = {lin.weight.data_ptr(): lin.weight.numel() * lin.weight.element_size() for lin in self.linears}
        return sum(seen.values())  # a tied weight (lm_head = embed) is streamed once

    def flops(self, rows: int) -> int:
        return sum(2 * rows * lin.in_features * lin.out_features for lin in self.linears)


def median_ms(fn, repeats: int) -> float:
    return 1e3 * statistics.median(seconds(fn, repeats, warmup=2))


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--heads", default=None, help=f"a heads folder (default {DEMO_HEADS}; fresh heads if absent)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="tree sizes (nodes)")
    p.add_argument("--prefix", type=int, default=256, help="cached tokens before the step (the tuner's default)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    base, tok = load_base_model(args.base, attn_implementation="sdpa")
    heads_dir = Path(args.heads) if args.heads else DEMO_HEADS
    if heads_dir.is_dir():
        heads, heads_name = MedusaHeads.from_pretrained(heads_dir), str(heads_dir)
    else:
        heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4)
        heads.init_from_lm_head(base.get_output_embeddings().weight)
        heads_name = "fresh (no trained heads found)"
    model = MedusaModel(base, heads, tok).eval()

    machine = cpu_description()
    print(f"{machine}\ntorch {torch.__version__}, {args.base} float32, heads {heads_name}, KV length {args.prefix}")
    bandwidth, peak = streaming_bandwidth(), sgemm_peak()
    print(f"streaming bandwidth {bandwidth / 1e9:.1f} GB/s, sgemm peak {peak / 1e9:.0f} GFLOP/s")

    gemms = StepGemms(model).eval()
    gemms_compiled = compiled._with_options(torch.compile(gemms, dynamic=True))
    t0 = time.perf_counter()
    compiled.compile_decoding(model, "on")
    compiled.warm_up(model, tuple(args.sizes))
    for n in args.sizes:
        gemms_compiled(gemms.inputs(n))
    compile_s = time.perf_counter() - t0
    print(f"compile + autotune: {compile_s:.0f} s (inductor's cache: {compiled.cache_location()})")

    trees = profile_trees(model.num_heads, args.sizes)
    step_fns = {"compiled": (model.step_fn, model.heads_fn), "eager": (model.step, model.medusa_logits)}
    steps = {}
    for name in ("eager", "compiled", "eager", "compiled"):  # two interleaved halves: a load that comes and goes
        model.step_fn, model.heads_fn = step_fns[name]  # hits both alike
        times = measure_step_times(model, trees, args.prefix, repeats=args.repeats // 2 + 1, progress=False)
        for n, seconds in times.median.items():
            steps.setdefault(name, {}).setdefault(n, []).append(1e3 * seconds)
    model.step_fn, model.heads_fn = step_fns["compiled"]
    steps = {name: {n: statistics.mean(v) for n, v in per.items()} for name, per in steps.items()}

    rows = []
    one = steps["compiled"][min(args.sizes)]
    header = (f"{'nodes':>5} {'eager ms':>9} {'compiled ms':>12} {'x 1 node':>9} {'gemms ms':>9} {'eager gemms':>12} "
              f"{'limit ms':>9} {'gemms/limit':>12} {'rest ms':>8}")  # fmt: skip
    print(header)
    for n in args.sizes:
        x = gemms.inputs(n)
        gemm_ms = median_ms(lambda x=x: gemms_compiled(x), args.repeats)
        eager_gemm_ms = median_ms(lambda x=x: gemms(x), args.repeats)
        limit_ms = 1e3 * max(gemms.weight_bytes() / bandwidth, gemms.flops(n) / peak)
        row = {"nodes": n, "eager_ms": steps["eager"][n], "compiled_ms": steps["compiled"][n],
               "x_one_node": steps["compiled"][n] / one, "gemms_ms": gemm_ms, "eager_gemms_ms": eager_gemm_ms,
               "limit_ms": limit_ms, "gemms_over_limit": gemm_ms / limit_ms,
               "rest_ms": steps["compiled"][n] - gemm_ms}  # fmt: skip
        rows.append(row)
        print(f"{n:>5} {row['eager_ms']:>9.1f} {row['compiled_ms']:>12.1f} {row['x_one_node']:>9.2f} "
              f"{gemm_ms:>9.1f} {eager_gemm_ms:>12.1f} {limit_ms:>9.1f} {row['gemms_over_limit']:>12.2f} "
              f"{row['rest_ms']:>8.1f}")  # fmt: skip
    speedup = steps["eager"][min(args.sizes)] / one
    print(f"compiled one-token step {speedup:.2f}x faster than eager; weights {gemms.weight_bytes() / 1e6:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "torch": torch.__version__, "base": args.base, "heads": heads_name,
            "prefix": args.prefix, "bandwidth_gbs": bandwidth / 1e9, "sgemm_gflops": peak / 1e9,
            "compile_s": compile_s, "rows": rows}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
