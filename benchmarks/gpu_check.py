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
  d train    20 bf16 head-training steps (MedusaObjective) through DeepSpeed when it imports, else plain torch
  sweep      kernel tiles (keys per tile x pipeline stages) around the dispatcher's choice, if time is left
A summary table is printed last; everything is written as JSON to --json after every section (a timeout still leaves
the finished sections on disk).

    python3 benchmarks/gpu_check.py --json out/gpu_check.json            # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --cpu-dry-run --json /tmp/dry.json   # same code paths, tiny, Triton interpreter

Uses the machine's own python3 and packages; the project is imported from this checkout without installing anything
(an installed medusa_toolkit wins). The toolkit needs a transformers with the `cache=` forward argument (5.24 here;
the GPU image's 5.17 predates it): carry the wheel (`make gpu-wheels`, README "GPU check").
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The checkout's package folders (pyproject.toml's package-dir): medusa_toolkit is toolkit/, its subpackages sit
# beside it.
PACKAGE_DIRS = {"": "toolkit", "train": "train", "verify": "verify", "export": "export", "kernels": "kernels"}
# SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct config.json, as converted by load_base_model).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# Random weights with the checkpoint's std (0.02) decode one token over and over; 0.1 gives varied greedy text and
# logit gaps like a trained model's (median top-2 gap ~0.35), so exactness and acceptance mean something.
RANDOM_INIT_STD = 0.1
# Per-dtype logit gap under which a divergence counts as a numerical tie (medusa_toolkit.verify's defaults).
TIE_TOLERANCE = {"float32": 1e-4, "float16": 0.1, "bfloat16": 0.5}
# Kernel vs float64 reference, max abs error allowed (outputs are averages of N(0, 1) values).
KERNEL_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


# ----------------------------------------------------------------------------------------------------------------------
# Run bookkeeping: progress lines, a global time budget, JSON written after every section


class Run:
    def __init__(self, json_path: Path | None, budget_s: float, dry: bool):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.json_path = json_path
        self.data: dict = {"dry_run": dry, "budget_s": budget_s, "sections": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        if self.json_path is None:
            return
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.json_path)

    def section(self, name: str, fn, share_s: float, reserve_s: float, *args) -> dict:
        """Run fn(run, deadline, *args) with deadline = now + share_s, never later than what leaves `reserve_s` for
        the sections after it. Its dict (or the error) is recorded; a section never stops the others."""
        if self.left() - reserve_s < 5:
            self.log(f"== {name}: skipped (time budget spent)")
            result = {"status": "skipped", "reason": "time budget spent"}
        else:
            deadline = min(time.perf_counter() + share_s, self.deadline - reserve_s)
            self.log(f"== {name} (up to {deadline - time.perf_counter():.0f} s)")
            t0 = time.perf_counter()
            try:
                result = fn(self, deadline, *args) or {}
                result.setdefault("status", "ok")
            except Exception as e:  # record and go on: later sections still run
                result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                self.log(f"   {name} FAILED: {type(e).__name__}: {e}")
                print(traceback.format_exc(limit=6), flush=True)
            result["seconds"] = round(time.perf_counter() - t0, 1)
        self.data["sections"][name] = result
        self.save()
        return result


# ----------------------------------------------------------------------------------------------------------------------
# Setup


def ensure_importable() -> str:
    """Import medusa_toolkit: installed, or from this checkout through a folder of links that mirrors pyproject's
    package-dir mapping (no pip, no setuptools, nothing written outside a temp folder). Returns how."""
    try:
        import medusa_toolkit  # noqa: F401

        return "installed"
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="medusa-shim-")) / "medusa_toolkit"
    shim.mkdir()
    for entry in (REPO / PACKAGE_DIRS[""]).iterdir():
        (shim / entry.name).symlink_to(entry)
    for sub, folder in PACKAGE_DIRS.items():
        if sub:
            (shim / sub).symlink_to(REPO / folder, target_is_directory=True)
    sys.path.insert(0, str(shim.parent))
    importlib.invalidate_caches()
    import medusa_toolkit  # noqa: F401

    return f"from the checkout via {shim}"


@dataclass
class Sizes:
    """Problem sizes: the real check, or tiny ones for --cpu-dry-run (same code paths)."""

    grid_random_cases: int
    grid_max_s: int
    stress: bool
    speed_batches: tuple
    speed_seq_lens: tuple
    speed_tree_sizes: tuple
    speed_heads: tuple  # (query heads, kv heads, head dim)
    split_sweep: tuple
    model: dict
    corpus: tuple  # (prompts, prompt length, new tokens)
    fit_steps: int
    exact_new_tokens: int
    exact_prompts: int
    speed_new_tokens: int
    trees: tuple
    train_steps: int
    train_batch: tuple  # (sequences, length)
    tile_sweep: tuple  # (keys per tile, pipeline stages) tried around the dispatcher's tile
    compile_limit: int | None  # variants run by the compile section (None: all)


FULL = Sizes(
    grid_random_cases=48,
    grid_max_s=6000,
    stress=True,
    speed_batches=(1, 8),
    speed_seq_lens=(4096, 16384, 32768, 131072),
    speed_tree_sizes=(64, 1),
    speed_heads=(32, 8, 128),
    split_sweep=((1, 1, 32768), (1, 64, 4096), (1, 64, 32768), (8, 1, 32768), (8, 64, 4096)),
    model=SMOLLM2_135M,
    corpus=(32, 8, 64),
    fit_steps=200,
    exact_new_tokens=64,
    exact_prompts=8,
    speed_new_tokens=128,
    trees=("chain-1", "chain-4", "mc_sim-16", "mc_sim_7b_63"),
    train_steps=20,
    train_batch=(8, 256),
    tile_sweep=tuple((n, st) for n in (16, 32, 64, 128) for st in (2, 3, 4)),
    compile_limit=None,
)
DRY = Sizes(
    grid_random_cases=6,
    grid_max_s=300,
    stress=False,
    speed_batches=(1,),
    speed_seq_lens=(256,),
    speed_tree_sizes=(4,),
    speed_heads=(4, 2, 64),
    split_sweep=((1, 4, 256),),
    model=dict(
        SMOLLM2_135M,
        vocab_size=256,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
    ),
    corpus=(8, 4, 24),
    fit_steps=40,
    exact_new_tokens=8,
    exact_prompts=2,
    speed_new_tokens=8,
    trees=("chain-2",),
    train_steps=3,
    train_batch=(2, 16),
    tile_sweep=((32, 2), (64, 3)),
    compile_limit=4,
)


def dtypes():
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def bench(fn, device, warmup_ms: float = 20, rep_ms: float = 80) -> float:
    """Median seconds per call: CUDA events through triton.testing.do_bench on a GPU, a wall clock on the CPU."""
    import torch

    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    fn()
    times = []
    end = time.perf_counter() + rep_ms / 1000
    while not times or (time.perf_counter() < end and len(times) < 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.tensor(0)  # keep the signature symmetric; nothing to synchronise on the CPU
    return sorted(times)[len(times) // 2]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# env


def section_env(run: Run, deadline: float, device, how: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "medusa_toolkit": how,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
    for name in ("deepspeed", "flash_attn"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as e:  # ImportError, or a broken install
            info[name] = f"not available ({type(e).__name__})"
    from transformers import LlamaModel

    info["transformers_cache_api"] = "cache" in inspect.signature(LlamaModel.forward).parameters
    for k, v in info.items():
        run.log(f"   {k}: {v}")
    return info


# ----------------------------------------------------------------------------------------------------------------------
# compile: every dispatcher variant, in parallel processes, into Triton's on-disk cache


def _variant_inputs(cfg, device):
    """Tiny inputs for which the dispatcher picks `cfg` (its dtype, head dim, tile and tree flag)."""
    import torch

    G = 4
    T = 1 if cfg.block_m == 16 else 16  # M = 4 (decode tile) or 64 (tree tile)
    if cfg.has_tree and T == 1:
        T, G = 4, 2  # M = 8: still the decode tile, with a tree
    q = torch.randn(1, 2 * G, T, cfg.head_dim, dtype=cfg.dtype, device=device)
    k = torch.randn(1, 2, 200, cfg.head_dim, dtype=cfg.dtype, device=device)
    tree = torch.ones(T, T, dtype=torch.bool, device=device).tril() if cfg.has_tree else None
    return q, k, torch.randn_like(k), tree


def compile_variants(configs, device_name: str) -> list[str]:
    """Run each SplitKernelConfig once with and once without splitting (so the reduce kernel of its dtype and head
    dim compiles too). Triton's file cache keeps the binaries for the main process. Returns problems found."""
    import torch

    from medusa_toolkit.kernels.flash_decode import flash_decode

    device = torch.device(device_name)
    problems = []
    for cfg in configs:
        q, k, v, tree = _variant_inputs(cfg, device)
        for splits in (1, 2):
            try:
                out = flash_decode(q, k, v, tree, num_splits=splits, backend="triton")
                if not torch.isfinite(out).all():
                    problems.append(f"{cfg}: non-finite output")
            except Exception as e:
                problems.append(f"{cfg}: {type(e).__name__}: {e}")
    sync(device)
    return problems


def _compile_worker(args):
    configs, device_name = args
    from medusa_toolkit.kernels import flash_decode as fd_mod  # noqa: F401  (imports the kernels in the worker)

    return compile_variants(configs, device_name)


def section_compile(run: Run, deadline: float, device, jobs: int, sizes: Sizes) -> dict:
    from medusa_toolkit.kernels.aot import dispatcher_variants
    from medusa_toolkit.kernels.flash_decode import SplitKernelConfig

    configs = [c for c in dispatcher_variants() if isinstance(c, SplitKernelConfig)][: sizes.compile_limit]
    if jobs <= 1:
        problems = compile_variants(configs, str(device))
        return {
            "variants": len(configs),
            "workers": 1,
            "problems": problems,
            "status": "ok" if not problems else "fail",
        }
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: workers start clean (this process has touched CUDA); they share Triton's on-disk cache with it. In the
    # dry run they only run the interpreter (nothing to compile), which still exercises this path.
    jobs = min(jobs, len(configs))
    chunks = [configs[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_path) as pool:
        results = list(
            pool.map(
                _compile_worker, [(c, str(device)) for c in chunks], timeout=max(30, deadline - time.perf_counter())
            )
        )
    problems = [p for r in results for p in r]
    return {"variants": len(configs), "workers": jobs, "problems": problems, "status": "ok" if not problems else "fail"}


def _worker_path() -> None:
    ensure_importable()


# ----------------------------------------------------------------------------------------------------------------------
# a: kernel correctness


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    T: int
    S: int
    D: int
    dtype: str
    tree: str | None  # None (causal), "shared" [T, T], "batch" [B, T, T]
    padded: bool  # random kv_lens per row (row 0 full)
    num_splits: int | None
    kv_slice: bool  # K/V as a view of a larger buffer
    note: str = ""


def correctness_cases(sizes: Sizes) -> list[Case]:
    """Every dtype x head dim x {decode tile, tree tile} x {causal, tree}, with random GQA, batch, lengths, padding,
    split counts and K/V layouts; then the long and odd cases (full run only)."""
    rng = random.Random(0)
    cases = []
    names = ["float16", "bfloat16", "float32"]
    dims = [64, 80, 96, 128]
    combos = [(dt, d, tile, tree) for dt in names for d in dims for tile in ("decode", "tree") for tree in (0, 1)]
    rng.shuffle(combos)
    for dt, d, tile, tree in combos[: sizes.grid_random_cases]:
        G = rng.choice([1, 4, 8])
        if tile == "decode":
            T = rng.choice([t for t in (1, 2, 4, 8, 16) if G * t <= 16])
        else:
            T = rng.choice([t for t in (3, 5, 16, 17, 33, 64) if G * t > 16])
        Hkv = rng.choice([1, 2, 4])
        S = rng.randint(T, sizes.grid_max_s) + rng.choice([0, 1, 63])
        cases.append(
            Case(
                B=rng.choice([1, 2, 3]),
                Hq=G * Hkv,
                Hkv=Hkv,
                T=T,
                S=S,
                D=d,
                dtype=dt,
                tree=(rng.choice(["shared", "batch"]) if tree else None),
                padded=rng.random() < 0.6,
                num_splits=rng.choice([None, None, 1, 2, 7, 64]),
                kv_slice=rng.random() < 0.3,
            )
        )
    if sizes.stress:
        cases += [
            Case(1, 32, 8, 64, 131072, 128, "bfloat16", "batch", False, None, False, "7B shape, 128k, 64-node tree"),
            Case(1, 32, 8, 1, 131072 + 37, 128, "float16", None, False, None, False, "128k + 37 keys, decoding"),
            Case(8, 32, 8, 16, 32768, 128, "bfloat16", "batch", True, None, True, "batch 8, padded, sliced cache"),
            Case(1, 8, 2, 16, 65536, 128, "float32", "batch", True, None, False, "fp32, 64k"),
            Case(2, 8, 1, 64, 64, 64, "float32", "shared", False, None, False, "S == T: no prefix, MQA"),
            Case(1, 4, 4, 1, 1, 128, "bfloat16", None, False, None, False, "one key"),
            Case(4, 32, 4, 64, 4099, 128, "bfloat16", "batch", True, 128, False, "GQA 8, 128 forced splits"),
            Case(3, 8, 8, 33, 1000, 96, "float16", "batch", True, 200, False, "more splits than blocks"),
        ]
    return cases


def make_case_inputs(case: Case, device, seed: int):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: 128k-key caches are big
    dt = dtypes()[case.dtype]
    S_buf = case.S + (37 if case.kv_slice else 0)
    q, k, v = (
        torch.randn(case.B, h, n, case.D, generator=gd, device=device).to(dt)
        for h, n in ((case.Hq, case.T), (case.Hkv, S_buf), (case.Hkv, S_buf))
    )
    if case.kv_slice:
        k, v = k[:, :, : case.S], v[:, :, : case.S]
    tree = None
    if case.tree:
        trees = [random_tree(case.T, g) for _ in range(case.B if case.tree == "batch" else 1)]
        tree = (torch.stack(trees) if case.tree == "batch" else trees[0]).to(device)
    lens = None
    if case.padded:
        lens = torch.randint(case.T, case.S + 1, (case.B,), generator=g)
        lens[0] = case.S
        lens = lens.to(device)
        for b in range(case.B):  # padding must never reach the result: poison it
            k[b, :, int(lens[b]) :] = float("nan")
            v[b, :, int(lens[b]) :] = float("nan")
    return q, k, v, tree, lens


def random_tree(T: int, g):
    """A random valid tree mask [T, T]: node i hangs under a random earlier node, sees itself and its ancestors."""
    import torch

    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if i > 0:
            mask[i] = mask[int(torch.randint(0, i, (1,), generator=g))]
        mask[i, i] = True
    return mask


def reference_f64(q, k, v, tree, lens):
    """Float64 attention with the dense mask, one (batch, kv head) at a time (bounded memory at 128k keys)."""
    import torch

    from medusa_toolkit.kernels.flash_decode import dense_attention_mask

    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    allowed = dense_attention_mask(T, S, tree, lens, batch=B, device=q.device)  # [B, T, S]
    out = torch.empty(B, Hq, T, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            kb, vb = k[b, h].double().nan_to_num(), v[b, h].double().nan_to_num()
            qb = q[b, h * G : (h + 1) * G].double().reshape(G * T, D)
            s = (qb @ kb.T) * D**-0.5
            s = s.view(G, T, S).masked_fill(~allowed[b][None], float("-inf"))
            out[b, h * G : (h + 1) * G] = torch.softmax(s, dim=-1).nan_to_num() @ vb
    return out


def sdpa_dense(q, k, v, tree, lens):
    import torch

    from medusa_toolkit.kernels.flash_decode import dense_attention_mask

    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask = dense_attention_mask(T, S, tree, lens, batch=B, device=q.device)[:, None]
    k, v = (x.nan_to_num().repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def section_kernel(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch

    from medusa_toolkit.kernels.flash_decode import flash_decode, flash_decode_reference

    rows, worst = [], {}
    cases = correctness_cases(sizes)
    for i, case in enumerate(cases):
        if time.perf_counter() > deadline:
            run.log(f"   stopped after {i} of {len(cases)} cases (section time)")
            break
        q, k, v, tree, lens = make_case_inputs(case, device, seed=i)
        ref = reference_f64(q, k, v, tree, lens)
        out = flash_decode(q, k, v, tree, lens, num_splits=case.num_splits, backend="triton")
        errs = {"kernel": (out.double() - ref).abs().max().item() if torch.isfinite(out).all() else float("inf")}
        errs["torch_ref"] = (flash_decode_reference(q, k, v, tree, lens).double() - ref).abs().max().item()
        try:
            errs["sdpa"] = (sdpa_dense(q, k, v, tree, lens).double() - ref).abs().max().item()
        except RuntimeError as e:  # out of memory on the biggest cases: the kernel check still stands
            errs["sdpa"] = f"{type(e).__name__}"
        tol = KERNEL_TOL[case.dtype]
        ok = errs["kernel"] <= tol
        rows.append({**asdict(case), **errs, "tol": tol, "pass": ok})
        worst[case.dtype] = max(worst.get(case.dtype, 0.0), errs["kernel"])
        if not ok or case.note:
            sdpa_err = errs["sdpa"] if isinstance(errs["sdpa"], str) else f"{errs['sdpa']:.2e}"
            run.log(
                f"   {'ok  ' if ok else 'FAIL'} {case.dtype:8} B={case.B} Hq={case.Hq}/{case.Hkv} T={case.T} "
                f"S={case.S} D={case.D} tree={case.tree} pad={case.padded} splits={case.num_splits}: "
                f"kernel {errs['kernel']:.2e} (sdpa {sdpa_err}) {case.note}"
            )
        del q, k, v, ref, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    failed = [r for r in rows if not r["pass"]]
    run.log(f"   {len(rows) - len(failed)}/{len(rows)} cases within tolerance; worst kernel error {worst}")
    return {
        "cases": rows,
        "ran": len(rows),
        "planned": len(cases),
        "failed": len(failed),
        "worst_error": worst,
        "status": "ok" if not failed and rows else "fail",
    }


def section_variants(run: Run, deadline: float, device) -> dict:
    """Registers, spills and shared memory of every kernel binary this process ran (Triton's JIT caches)."""
    fd = importlib.import_module("medusa_toolkit.kernels.flash_decode")
    rows = []
    for fn in (fd._flash_decode_split_kernel, fd._flash_decode_reduce_kernel):
        for compiled in _jit_binaries(fn):
            src = getattr(compiled, "src", None)
            consts = {}
            for key, value in (getattr(src, "constants", None) or {}).items():
                idx = key[0] if isinstance(key, tuple) else key
                name = fn.arg_names[idx] if isinstance(idx, int) and idx < len(fn.arg_names) else str(idx)
                consts[name] = value
            signature = getattr(src, "signature", {}) or {}
            md = compiled.metadata
            rows.append(
                {
                    "kernel": fn.__name__ if hasattr(fn, "__name__") else str(fn),
                    "dtype": signature.get("Out") or signature.get("Q"),
                    "constexprs": consts,
                    "num_warps": getattr(md, "num_warps", None),
                    "num_stages": getattr(md, "num_stages", None),
                    "registers": getattr(compiled, "n_regs", None),
                    "spills": getattr(compiled, "n_spills", None),
                    "shared_kb": round(getattr(md, "shared", 0) / 1024, 1),
                }
            )
    if not rows:
        note = "no compiled binaries (Triton interpreter)" if device.type != "cuda" else "JIT caches not readable"
        run.log(f"   {note}")
        return {"variants": [], "note": note, "status": "ok" if device.type != "cuda" else "unknown"}
    rows.sort(key=lambda r: (r["kernel"], str(r["dtype"]), str(sorted(r["constexprs"].items()))))
    for r in rows:
        c = r["constexprs"]
        shape = (
            f"D={c.get('HEAD_DIM')} M={c.get('BLOCK_M')} N={c.get('BLOCK_N')} tree={c.get('HAS_TREE')}"
            if "BLOCK_M" in c
            else f"D={c.get('HEAD_DIM')} R={c.get('BLOCK_R')}"
        )
        run.log(
            f"   {r['kernel'][:28]:28} {str(r['dtype']):6} {shape:34} warps={r['num_warps']} stages={r['num_stages']} "
            f"regs={r['registers']} spills={r['spills']} smem={r['shared_kb']}KB"
        )
    spilling = [r for r in rows if r["spills"]]
    return {"variants": rows, "spilling": len(spilling), "status": "ok" if not spilling else "warn"}


def _jit_binaries(fn) -> list:
    """CompiledKernel objects in a JITFunction's caches (the layout differs between Triton versions)."""
    found = []
    caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", None) or {}
    for entry in caches.values():
        parts = entry if isinstance(entry, (tuple, list)) else (entry,)
        for part in parts:
            if isinstance(part, dict):
                found += [k for k in part.values() if hasattr(k, "metadata")]
    return found


# ----------------------------------------------------------------------------------------------------------------------
# b: kernel speed


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), device, warmup_ms=50, rep_ms=200)
    return 2 * n / t


def section_speed(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch

    bw = copy_bandwidth(device)
    run.log(f"   device copy: {bw / 1e9:.0f} GB/s (read + write)")
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        flash_attn_with_kvcache = None
    rows = []
    for T in sizes.speed_tree_sizes:
        for B in sizes.speed_batches:
            for S in sizes.speed_seq_lens:
                if time.perf_counter() > deadline:
                    break
                row = speed_case(B, T, S, sizes.speed_heads, device, bw, flash_attn_with_kvcache)
                rows.append(row)
                run.log(
                    f"   B={B} T={T:>2} S={S:>6}: ours {row.get('flash_decode_us')} us "
                    f"({row.get('pct_of_copy')}% of copy BW), sdpa {row.get('sdpa_us')} us, "
                    f"flash-attn {row.get('flash_attn_us')} us"
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    tree_rows = [r for r in rows if r["T"] == max(sizes.speed_tree_sizes) and r.get("pct_of_copy")]
    long = [r for r in tree_rows if r["S"] >= 16384]
    at32k = [r for r in tree_rows if r["B"] == 1 and r["S"] == 32768 and r.get("x_sdpa")]
    goals = {
        "bandwidth_ge_80pct_at_kv_ge_16k": (all(r["pct_of_copy"] >= 80 for r in long) if long else None),
        "min_pct_at_kv_ge_16k": min((r["pct_of_copy"] for r in long), default=None),
        "ge_2x_sdpa_at_b1_kv32k": (at32k[0]["x_sdpa"] >= 2 if at32k else None),
        "x_sdpa_at_b1_kv32k": at32k[0]["x_sdpa"] if at32k else None,
    }
    run.log(f"   goals: {goals}")
    missed = [k for k in ("bandwidth_ge_80pct_at_kv_ge_16k", "ge_2x_sdpa_at_b1_kv32k") if goals[k] is False]
    return {
        "copy_gbs": round(bw / 1e9, 1),
        "flash_attn": flash_attn_with_kvcache is not None,
        "rows": rows,
        "goals": goals,
        "status": "ok" if not missed else "goal missed",
    }


def speed_case(B: int, T: int, S: int, heads: tuple, device, copy_bw: float, flash_attn_with_kvcache) -> dict:
    """One shape: us per call of each method on bf16 inputs, rotating input sets larger than L2 together."""
    import torch

    from medusa_toolkit.kernels.flash_decode import dense_attention_mask, flash_decode, pack_tree_mask

    Hq, Hkv, D = heads
    dt = torch.bfloat16
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 20
    kv_bytes = 2 * B * Hkv * S * D * 2
    sets = max(1, min(8, math.ceil(4 * l2 / kv_bytes)))  # repeated calls must stream from HBM, not from L2
    data = []
    for _ in range(sets):
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dt)
        data.append((torch.randn(B, Hq, T, D, device=device, dtype=dt), k, torch.randn_like(k)))
    g = torch.Generator().manual_seed(S + T)
    tree = torch.stack([random_tree(T, g) for _ in range(B)]).to(device) if T > 1 else None
    packed = pack_tree_mask(tree) if tree is not None else None
    mask = dense_attention_mask(T, S, tree, batch=B, device=device)[:, None] if T > 1 else None
    rotation = Rotation(data)
    methods = {
        "flash_decode": lambda: flash_decode(*rotation.next(), packed, backend="triton", check_kv_lens=False),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            *rotation.next(), attn_mask=mask, enable_gqa=True
        ),
    }
    if flash_attn_with_kvcache is not None:
        # flash-attn wants [B, L, H, D] and has no tree mask: causal=True over the prefix reads the same bytes (a
        # speed reference, not the same computation).
        fa = Rotation([tuple(x.transpose(1, 2).contiguous() for x in qkv) for qkv in data])
        methods["flash_attn"] = lambda: flash_attn_with_kvcache(*fa.next(), causal=True)
    row = {"B": B, "T": T, "S": S, "kv_mb": round(kv_bytes / 2**20, 1), "input_sets": sets, "flash_attn_us": None}
    for name, fn in methods.items():
        try:
            row[f"{name}_us"] = round(bench(fn, device) * 1e6, 1)
        except Exception as e:  # out of memory (SDPA's dense path at 128k x 8), unsupported, ...
            row[f"{name}_us"] = None
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    t = row["flash_decode_us"]
    if t:
        moved = kv_bytes + 2 * B * Hq * T * D * 2  # K/V once, q in, out back
        row["bandwidth_gbs"] = round(moved / (t * 1e-6) / 1e9, 1)
        row["pct_of_copy"] = round(100 * moved / (t * 1e-6) / copy_bw, 1)
        for other, key in (("sdpa", "x_sdpa"), ("flash_attn", "x_flash_attn")):
            if row.get(f"{other}_us"):
                row[key] = round(row[f"{other}_us"] / t, 2)
    return row


class Rotation:
    """Cycles through input sets, so that timed calls stream from HBM rather than from L2."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def section_splits(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    """Forced split counts vs the heuristic's choice: calibration data for default_num_splits."""
    rows = []
    for B, T, S in sizes.split_sweep:
        if time.perf_counter() > deadline:
            break
        row = splits_case(B, T, S, sizes.speed_heads, device, deadline)
        rows.append(row)
        us = row["us"]
        run.log(
            f"   B={B} T={T} S={S}: auto {row['auto']} splits {us[row['auto']]} us, best {row['best']} splits {us[row['best']]} us"
        )
    return {"rows": rows}


def splits_case(B: int, T: int, S: int, heads: tuple, device, deadline: float) -> dict:
    import torch

    from medusa_toolkit.kernels.flash_decode import (
        PROGRAMS_PER_SM,
        default_num_splits,
        flash_decode,
        pack_tree_mask,
        split_kernel_config,
    )

    Hq, Hkv, D = heads
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    q = torch.randn(B, Hq, T, D, device=device, dtype=dt)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dt)
    v = torch.randn_like(k)
    tree = pack_tree_mask(random_tree(T, torch.Generator().manual_seed(1)).to(device)) if T > 1 else None
    rows_m = Hq // Hkv * T
    cfg = split_kernel_config(dt, D, rows_m, T if T > 1 else None)
    m_blocks = -(-rows_m // cfg.block_m)
    auto = default_num_splits(
        B, Hkv, S, m_blocks, sms, rows=rows_m, head_dim=D, elem_bytes=2, block_n=cfg.block_n,
        programs_per_sm=PROGRAMS_PER_SM[dt],
    )  # fmt: skip
    times = {}
    for s in sorted({1, 2, 4, 8, 16, 32, 64, 128, auto}):
        if s <= -(-S // cfg.block_n) and (s == auto or time.perf_counter() < deadline):
            fn = functools.partial(flash_decode, q, k, v, tree, num_splits=s, backend="triton")
            times[s] = round(bench(fn, device) * 1e6, 1)
    best = min(times, key=times.get)
    return {
        "B": B,
        "T": T,
        "S": S,
        "auto": auto,
        "us": times,
        "best": best,
        "auto_vs_best": round(times[auto] / times[best], 3),
    }


def section_tiles(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    """Keys per tile x pipeline stages around the dispatcher's tiles, bf16, batch 1, kv 32k: tuning data."""
    import dataclasses

    import torch

    from medusa_toolkit.kernels.flash_decode import _flash_decode_triton, pack_tree_mask, split_kernel_config

    Hq, Hkv, D = sizes.speed_heads
    dt = torch.bfloat16
    S = 32768 if device.type == "cuda" else 256
    rows = []
    for T in (1, 64) if device.type == "cuda" else (4,):
        q = torch.randn(1, Hq, T, D, device=device, dtype=dt)
        k = torch.randn(1, Hkv, S, D, device=device, dtype=dt)
        v = torch.randn_like(k)
        tree = pack_tree_mask(random_tree(T, torch.Generator().manual_seed(2)).to(device)) if T > 1 else None
        base = split_kernel_config(dt, D, Hq // Hkv * T, T if T > 1 else None)
        # The dispatcher's own tile first (the reference the others are read against), then the sweep.
        for n, st in dict.fromkeys([(base.block_n, base.num_stages), *sizes.tile_sweep]):
            if time.perf_counter() > deadline:
                break
            cfg = dataclasses.replace(base, block_n=n, num_stages=st)
            fn = functools.partial(_flash_decode_triton, q, k, v, tree, None, D**-0.5, None, None, None, config=cfg)
            try:
                us = round(bench(fn, device) * 1e6, 1)
            except Exception as e:  # out of shared memory, ...
                us = f"{type(e).__name__}"
            rows.append({"T": T, "block_m": base.block_m, "block_n": n, "stages": st, "us": us, "default": cfg == base})
            run.log(f"   T={T} tile {base.block_m}x{n} stages {st}: {us} us{'  (default)' if cfg == base else ''}")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# c: end to end Medusa decoding


def build_base(sizes: Sizes, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes.model, initializer_range=RANDOM_INIT_STD)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device).eval()
    base.set_attn_implementation("sdpa")
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def fit_heads(base, sizes: Sizes, device, deadline: float):
    """Heads self-distilled briefly on the base's own greedy text (4 heads, per-head vocab projections)."""
    import torch

    from medusa_toolkit import MedusaHeads
    from medusa_toolkit.train.losses import MedusaObjective

    n, plen, new = sizes.corpus
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, base.config.vocab_size, (n, plen), generator=g).to(device)
    with torch.no_grad():
        corpus = base.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new,
            min_new_tokens=new, pad_token_id=base.config.pad_token_id,
        )  # fmt: skip
        hidden = base.get_decoder()(corpus).last_hidden_state
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4, head_type="per_head_lm_head").to(device)
    heads.init_from_lm_head(base.get_output_embeddings().weight)
    objective = MedusaObjective(heads, base.get_output_embeddings().weight, loss="ce", decay=0.8)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    mask = torch.ones_like(corpus)
    steps, stats = 0, None
    while steps < sizes.fit_steps and (steps == 0 or time.perf_counter() < deadline):
        loss, stats = objective(hidden, corpus, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    top1 = (stats[:, 2] / stats[:, 1].clamp(min=1)).tolist()
    return heads.eval(), corpus, steps, top1


def generate_batch(model, input_ids, attention_mask, max_new_tokens: int, **kw):
    """Batched Medusa decoding through the public API: `medusa_generate_batch` where the toolkit exports it, else
    `medusa_generate` with an attention mask (which took batches before the decoding API was split)."""
    import medusa_toolkit

    if hasattr(medusa_toolkit, "medusa_generate_batch"):
        return medusa_toolkit.medusa_generate_batch(model, input_ids, attention_mask, max_new_tokens, **kw)
    if attention_mask is None:
        attention_mask = input_ids.new_ones(input_ids.shape)
    return medusa_toolkit.medusa_generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, **kw)


def first_divergence(ref: list, got: list) -> int | None:
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def classify(base, ref_row, got_row, prompt_len: int, dtype_name: str) -> dict:
    """exact, or the first divergence: a tie when the reference's logits there are within the tie tolerance."""
    import torch

    ref, got = ref_row.tolist(), got_row.tolist()
    i = first_divergence(ref, got)
    if i is None:
        return {"result": "exact"}
    if i >= min(len(ref), len(got)):
        return {"result": "mismatch", "position": i - prompt_len, "why": "different lengths"}
    with torch.no_grad():
        prefix = torch.tensor([ref[:i]], device=next(base.parameters()).device)
        logits = base(prefix, attention_mask=torch.ones_like(prefix)).logits[0, -1].float()
    gap = (logits[ref[i]] - logits[got[i]]).item()
    kind = "tie" if gap <= TIE_TOLERANCE[dtype_name] else "mismatch"
    return {"result": kind, "position": i - prompt_len, "ref_token": ref[i], "got_token": got[i], "logit_gap": gap}


def exact_prompts(corpus, sizes: Sizes, vocab: int) -> list:
    """Prefixes of the heads' training text (long accepted paths) and random prompts (mostly rejected)."""
    import torch

    g = torch.Generator().manual_seed(7)
    half = sizes.exact_prompts // 2
    prompts = [corpus[i, : 5 + 3 * i].cpu() for i in range(half)]
    prompts += [
        torch.randint(3, vocab, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g)
        for _ in range(sizes.exact_prompts - half)
    ]
    return prompts


def section_e2e(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch
    from transformers import LlamaModel

    from medusa_toolkit import MedusaModel, MedusaTree, medusa_generate

    if "cache" not in inspect.signature(LlamaModel.forward).parameters:
        import transformers

        return {
            "status": "skipped",
            "reason": f"transformers {transformers.__version__} has no `cache=` forward argument, which the toolkit's "
            "decoding uses (it has `past_key_values`): carry the .venv's transformers wheel (make gpu-wheels)",
        }
    t0 = time.perf_counter()
    base = build_base(sizes, device)
    heads, corpus, fit_steps, top1 = fit_heads(base, sizes, device, deadline=t0 + 0.2 * (deadline - t0))
    run.log(
        f"   base {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params; heads fitted {fit_steps} steps, top-1 {[round(x, 2) for x in top1]}"
    )
    mc = MedusaTree.preset("mc_sim_7b_63")
    trees = {
        name: (MedusaTree.from_paths(mc.paths[:15], name=name) if name == "mc_sim-16" else MedusaTree.resolve(name, 4))
        for name in sizes.trees
    }
    exact_tree = trees[sizes.trees[-1]]
    prompts = exact_prompts(corpus, sizes, base.config.vocab_size)
    N = sizes.exact_new_tokens
    result = {"fit_steps": fit_steps, "heads_top1": top1, "exactness": {}, "speed": {}}
    for dtype_name in ("float32", "bfloat16"):
        if time.perf_counter() > deadline:
            break
        base.to(dtypes()[dtype_name])
        model = MedusaModel(base, heads)
        refs, counts = [], {"exact": 0, "tie": 0, "mismatch": 0}
        details = []
        with torch.no_grad():
            for p in prompts:
                ids = p[None].to(device)
                refs.append(
                    base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N)[0]
                )
        accept = []
        for b, p in enumerate(prompts):  # batch 1
            out = medusa_generate(
                model, p[None].to(device), N, tree=exact_tree, attn_implementation="medusa_flash_decoding"
            )
            c = classify(base, refs[b], out.sequences[0], len(p), dtype_name)
            counts[c["result"]] += 1
            accept.append(out.mean_accept_length)
            if c["result"] != "exact":
                details.append({"batch": 1, "prompt": b, **c})
        batch_counts = {"exact": 0, "tie": 0, "mismatch": 0}
        width = max(len(p) for p in prompts)  # batch 8: left-padded prompts of different lengths
        pad = base.config.pad_token_id
        ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts]).to(device)
        mask = (
            torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts])
            .long()
            .to(device)
        )
        out = generate_batch(model, ids, mask, N, tree=exact_tree, attn_implementation="medusa_flash_decoding")
        for b, row in enumerate(out.rows()):
            c = classify(base, refs[b], row, len(prompts[b]), dtype_name)
            batch_counts[c["result"]] += 1
            if c["result"] != "exact":
                details.append({"batch": len(prompts), "prompt": b, **c})
        result["exactness"][dtype_name] = {
            "tree": exact_tree.name, "nodes": exact_tree.num_nodes, "new_tokens": N,
            "batch1": counts, f"batch{len(prompts)}": batch_counts,
            "mean_accept_length_batch1": round(sum(accept) / len(accept), 2), "divergences": details,
        }  # fmt: skip
        run.log(
            f"   {dtype_name}: batch 1 {counts}, batch {len(prompts)} {batch_counts}, accept {sum(accept) / len(accept):.2f}"
        )
        if dtype_name == "bfloat16":  # the GPU serving dtype; fp32 is for exactness
            result["speed"][dtype_name] = speed_e2e(run, deadline, device, base, model, trees, corpus, sizes)
        run.save()
    fp32, bf16 = result["exactness"].get("float32"), result["exactness"].get("bfloat16")
    ok = fp32 is not None and all(
        fp32[k]["mismatch"] == 0 and fp32[k]["tie"] == 0 for k in fp32 if k.startswith("batch")
    )
    ok = ok and bf16 is not None and all(bf16[k]["mismatch"] == 0 for k in bf16 if k.startswith("batch"))
    result["status"] = "ok" if ok else "fail"
    return result


def speed_e2e(run: Run, deadline: float, device, base, model, trees: dict, corpus, sizes: Sizes) -> dict:
    """Tokens/s of base greedy generate() vs medusa_generate per tree, batch 1 (corpus prompt and random prompt)
    and batch 8, exactly N new tokens each (no early EOS)."""
    import torch

    from medusa_toolkit import medusa_generate

    N = sizes.speed_new_tokens
    rows = []
    g = torch.Generator().manual_seed(9)
    prompts = {
        "corpus": corpus[0:1, :12],
        "random": torch.randint(3, base.config.vocab_size, (1, 12), generator=g).to(device),
        "batch": corpus[: min(8, corpus.shape[0]), :12],
    }

    def greedy(ids, n):
        return base.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=base.config.pad_token_id,
        )  # fmt: skip

    def medusa(ids, tree, n):
        if ids.shape[0] > 1:
            return generate_batch(
                model, ids, None, n, tree=tree, eos_token_id=[], attn_implementation="medusa_flash_decoding"
            )
        return medusa_generate(model, ids, n, tree=tree, eos_token_id=[], attn_implementation="medusa_flash_decoding")

    def timed(fn):
        fn(8)  # a short warm-up (allocator, library handles; the kernels are compiled already)
        sync(device)
        t = time.perf_counter()
        out = fn(N)
        sync(device)
        return time.perf_counter() - t, out

    with torch.no_grad():
        for label, ids in prompts.items():
            t_base, _ = timed(functools.partial(greedy, ids))
            base_tps = ids.shape[0] * N / t_base
            rows.append(
                {"prompt": label, "batch": ids.shape[0], "decoder": "base_greedy", "tokens_per_s": round(base_tps, 1)}
            )
            for name, tree in trees.items():
                if time.perf_counter() > deadline:
                    break
                t, out = timed(functools.partial(medusa, ids, tree))
                tps = ids.shape[0] * N / t
                rows.append({
                    "prompt": label, "batch": ids.shape[0], "decoder": name, "nodes": tree.num_nodes,
                    "accept_length": round(out.mean_accept_length, 2), "tokens_per_s": round(tps, 1),
                    "x_base": round(tps / base_tps, 2),
                })  # fmt: skip
            done = ", ".join(f"{r['decoder']} {r['tokens_per_s']}" for r in rows if r["prompt"] == label)
            run.log(f"   {done} tok/s ({label}, batch {ids.shape[0]})")
    return {"new_tokens": N, "rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# d: training smoke


def section_train(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch

    from medusa_toolkit import MedusaHeads
    from medusa_toolkit.train.losses import MedusaObjective

    base = build_base(sizes, device).to(torch.bfloat16)
    n, length = sizes.train_batch
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, base.config.vocab_size, (n, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4, head_type="per_head_lm_head").to(device)
    heads.init_from_lm_head(base.get_output_embeddings().weight.float())
    objective = MedusaObjective(heads, base.get_output_embeddings().weight, loss="ce", decay=0.8)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    try:
        import deepspeed
    except Exception as e:  # not installed here (the GPU image has no DeepSpeed unless its wheel travels)
        deepspeed, why = None, f"{type(e).__name__}: {e}"
    if deepspeed is not None:
        how = f"deepspeed {deepspeed.__version__} (ZeRO-0, bf16, torch AdamW)"
        _init_world_of_one(deepspeed, device)
        engine, *_ = deepspeed.initialize(
            model=objective,
            model_parameters=params,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": n,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 0},
                "bf16": {"enabled": True},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )

        def step(hidden):
            loss, stats = engine(hidden, ids, mask)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        how = f"plain torch (bf16 autocast, fp32 AdamW): DeepSpeed unavailable ({why})"

        def step(hidden):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, stats = objective(hidden, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return loss

    run.log(f"   training through {how}")
    losses, times = [], []
    for _ in range(sizes.train_steps):
        # The steps themselves are short; what can eat the section's time is DeepSpeed's first start (a CPU build of
        # its shm op takes a minute), so only the whole run's deadline stops them.
        if losses and time.perf_counter() > run.deadline:
            break
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hidden = base.get_decoder()(ids).last_hidden_state  # the frozen base forward, as in the train stage
        losses.append(float(step(hidden).detach()))
        sync(device)
        times.append(time.perf_counter() - t)
    if not losses:
        return {"how": how, "deepspeed": deepspeed is not None, "steps": 0, "status": "fail", "reason": "no time left"}
    timed = times[1:] or times  # the first step pays for allocations and autotuning
    tps = n * length * len(timed) / sum(timed)
    run.log(f"   {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tps:.0f} tokens/s")
    ok = len(losses) == sizes.train_steps and all(math.isfinite(x) for x in losses)
    return {
        "how": how,
        "deepspeed": deepspeed is not None,
        "steps": len(losses),
        "batch": [n, length],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_s": round(tps, 1),
        "status": "ok" if ok else "fail",
    }


def _init_world_of_one(deepspeed, device) -> None:
    import socket

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


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
        ("e2e", section_e2e, (device, sizes), 0.26, 0.06),
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
