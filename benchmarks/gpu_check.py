"""`make gpu-check`: the whole GPU path of medusa-toolkit checked and timed on one CUDA GPU, in one command, <= 5 min.

Sections (in this order; each one is timed, budgeted and recorded even when it fails or runs out of time):
  env        versions, device, what is installed (DeepSpeed, flash-attn, a transformers with the `cache=` API)
  compile    every kernel variant the dispatcher can choose, JIT-compiled in parallel worker processes first
  a kernel   compiled Triton flash_decode vs flash_decode_reference vs SDPA with the dense mask, max error of each
             against a float64 reference, over dtypes x head dims x GQA 1/4/8 x batch 1-8 x kv 1..128k (lengths
             that are not multiples of the tile) x trees 1..64 x padded kv_lens x num_splits auto/forced x K/V as a
             slice of a larger buffer; then registers / spills / shared memory of every variant as compiled here
  b speed    us per call of flash_decode vs SDPA (dense mask) vs flash-attn's flash_attn_with_kvcache (if
             installed; prefix only), 32 query / 8 kv heads, D=128, bf16, batch 1 and 8, kv 4k-128k, 64 tree tokens
             (and T=1), achieved HBM bandwidth as % of a measured device copy; goals >= 80% at kv >= 16k and >= 2x
             SDPA at batch 1, kv 32k; forced split counts against the heuristic's choice
  c e2e      Medusa decoding on a SmolLM2-135M-shaped Llama (random weights, heads fitted briefly to its own greedy
             text): token ids vs generate() in fp32 and bf16 (ties classified by the reference's logit gap),
             attention medusa_flash_decoding, batch 1 and 8; tokens/s of Medusa vs base greedy at several tree sizes
  step       the decoding step eager vs compiled (decoding.compiled) per tree size 1-32, bf16, SmolLM2-135M-shaped
  d train    20 bf16 head-training steps (MedusaObjective) through DeepSpeed when it imports, else plain torch
  sweep      kernel tiles (keys per tile x pipeline stages) around the dispatcher's choice, if time is left
A summary table is printed last; everything is written as JSON to --json after every section (a timeout still leaves
the finished sections on disk). Each section is a module beside this one (gpu_check_env, _compile, _kernel (a),
_speed (b: speed, splits, tiles), _e2e (c), _step, _train (d)); gpu_check_run holds the run's bookkeeping and setup. This file
is the entry point: the plan, the summary, main(). `step` (gpu_check_step) is the GPU's column of bench_roofline.py.

    python3 benchmarks/gpu_check.py --json out/gpu_check.json            # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --cpu-dry-run --json /tmp/dry.json   # same code paths, tiny, Triton interpreter

Uses the machine's own python3 and packages; the project is imported from this checkout without installing anything
(an installed medusa_toolkit wins). The toolkit needs a transformers with the `cache=` forward argument (5.24 here;
the GPU image's 5.17 predates it): carry the wheel (`make gpu-wheels`, README "GPU check").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpu_check_compile import section_compile
from gpu_check_e2e import section_e2e
from gpu_check_env import section_env
from gpu_check_kernel import section_kernel, section_variants
from gpu_check_run import DRY, FULL, Run, ensure_importable
from gpu_check_speed import section_speed, section_splits, section_tiles
from gpu_check_step import section_step
from gpu_check_train import section_train

# ----------------------------------------------------------------------------------------------------------------------
# e: summary


def summary(run: Run) -> list[str]:
    s = run.data["sections"]
    lines = ["== gpu-check summary" + (" (CPU DRY RUN: interpreter, tiny sizes)" if run.data["dry_run"] else "")]
    env = s.get("env", {})
    lines.append(
        f"device     {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}"
    )

    def status(name):
        sec = s.get(name, {})
        why = sec.get("error") or sec.get("reason")
        return sec.get("status", "not run") + (f" ({why})" if why else "")

    c = s.get("compile", {})
    lines.append(f"compile    {status('compile')}: {c.get('variants')} split variants, {c.get('workers')} workers")
    a = s.get("kernel", {})
    lines.append(
        f"kernel     {status('kernel')}: {a.get('ran', 0) - a.get('failed', 0)}/{a.get('ran')} cases within tolerance "
        f"(of {a.get('planned')}); worst error {a.get('worst_error')}"
    )
    v = s.get("variants", {})
    lines.append(
        f"variants   {status('variants')}: {len(v.get('variants', []))} binaries, {v.get('spilling', 0)} spilling"
    )
    b = s.get("speed", {})
    lines.append(f"speed      {status('speed')}: copy {b.get('copy_gbs')} GB/s; goals {b.get('goals')}")
    for r in b.get("rows", []):
        lines.append(
            f"             B={r['B']} T={r['T']:>2} S={r['S']:>6}  ours {r.get('flash_decode_us')} us "
            f"{r.get('pct_of_copy')}% BW  sdpa {r.get('sdpa_us')} us (x{r.get('x_sdpa')})  flash-attn {r.get('flash_attn_us')}"
        )
    e = s.get("e2e", {})
    lines.append(f"e2e        {status('e2e')}: heads top-1 {[round(x, 2) for x in e.get('heads_top1', [])]}")
    for dt, ex in e.get("exactness", {}).items():
        batches = {k: v for k, v in ex.items() if k.startswith("batch")}
        lines.append(f"             {dt} {ex['tree']} ({ex['nodes']} nodes): {batches}")
    for dt, sp in e.get("speed", {}).items():
        for r in sp.get("rows", []):
            lines.append(
                f"             {dt} {r['prompt']:6} b{r['batch']} {r['decoder']:14} {r['tokens_per_s']:>8} tok/s"
                + (f"  accept {r['accept_length']}  x{r['x_base']}" if "x_base" in r else "")
            )
    st = s.get("step", {})
    lines.append(
        f"step       {status('step')}: {st.get('dtype')}, compiled {st.get('compiled')} ({st.get('compile_s')} s)"
    )
    for r in st.get("rows", []):
        lines.append(f"             {r['nodes']:>3} nodes: eager {r['eager_ms']} ms, compiled {r['compiled_ms']} ms "
                     f"(x{r['x_eager']}), {r['x_one_node']}x one node")  # fmt: skip
    d = s.get("train", {})
    lines.append(
        f"train      {status('train')}: {d.get('steps')} steps via {d.get('how')}, {d.get('tokens_per_s')} tokens/s"
    )
    sp = s.get("splits", {})
    for r in sp.get("rows", []):
        lines.append(
            f"splits     B={r['B']} T={r['T']} S={r['S']}: auto {r['auto']} -> {r['us'][r['auto']]} us, best {r['best']} -> {r['us'][r['best']]} us"
        )
    t = s.get("tiles", {})
    if t.get("rows"):
        best = {}
        for r in t["rows"]:
            if isinstance(r["us"], float) and (r["T"] not in best or r["us"] < best[r["T"]]["us"]):
                best[r["T"]] = r
        for T, r in best.items():
            default = next((x for x in t["rows"] if x["T"] == T and x["default"]), {})
            lines.append(
                f"tiles      T={T}: best {r['block_m']}x{r['block_n']} stages {r['stages']} {r['us']} us; default {default.get('us')} us"
            )
    lines.append(f"total      {run.elapsed():.0f} s of a {run.data['budget_s']:.0f} s budget")
    return lines


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here (updated after every section)")
    p.add_argument("--budget", type=float, default=285.0, help="seconds for the whole run (default 285)")
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny sizes on the CPU, kernels in the Triton interpreter"
    )
    p.add_argument("--jobs", type=int, default=None, help="processes compiling kernels (default: CPUs, at most 16)")
    p.add_argument("--only", nargs="+", help="run only these sections (env always runs)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (the @triton.jit decorators read it)
    # Where DeepSpeed JIT-builds its ops (the CPU accelerator's shm comm op): the Makefile's folder, built once.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "medusa-toolkit" / "torch_extensions"))
    how = ensure_importable()
    import torch

    if args.cpu_dry_run:
        device, sizes = torch.device("cpu"), DRY
        torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save on a busy CPU
    else:
        if not torch.cuda.is_available():
            print("gpu_check.py needs a CUDA GPU (none found); --cpu-dry-run runs the same code paths on the CPU")
            return 2
        device, sizes = torch.device("cuda", torch.cuda.current_device()), FULL
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or min(16, os.cpu_count() or 1)
    run = Run(args.json, args.budget, args.cpu_dry_run)
    run.log(f"gpu-check on {device}, budget {args.budget:.0f} s, JSON -> {args.json}")
    wanted = (lambda name: True) if not args.only else (lambda name: name in args.only)

    budget = args.budget
    plan = [  # name, function, extra args, share of the budget, reserve kept for the sections after it
        ("compile", section_compile, (device, jobs, sizes), 0.20, 0.62),
        ("kernel", section_kernel, (device, sizes), 0.16, 0.46),
        ("variants", section_variants, (device,), 0.02, 0.44),
        ("speed", section_speed, (device, sizes), 0.14, 0.30),
        ("e2e", section_e2e, (device, sizes), 0.22, 0.14),
        ("step", section_step, (device, sizes), 0.10, 0.06),
        ("train", section_train, (device, sizes), 0.08, 0.0),
        ("splits", section_splits, (device, sizes), 0.08, 0.0),
        ("tiles", section_tiles, (device, sizes), 0.10, 0.0),
    ]
    run.section("env", section_env, 30, budget * 0.9, device, how)
    for name, fn, extra, share, reserve in plan:
        if not wanted(name):
            continue
        run.section(name, fn, share * budget, reserve * budget, *extra)
    lines = summary(run)
    run.data["summary"] = lines
    run.save()
    print("\n".join(lines), flush=True)
    bad = [n for n, s in run.data["sections"].items() if s.get("status") in ("error", "fail")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
