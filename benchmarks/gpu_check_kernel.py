"""gpu_check.py section a, `kernel` and `variants`: compiled Triton flash_decode vs flash_decode_reference vs SDPA
against a float64 reference over a grid of shapes; registers, spills and shared memory of every binary."""

from __future__ import annotations

import importlib
import random
import time
from dataclasses import asdict, dataclass

from gpu_check_run import Run, Sizes, dtypes

# Kernel vs float64 reference, max abs error allowed (outputs are averages of N(0, 1) values).
KERNEL_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


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

    from medusa_toolkit.testing.trees import random_tree_mask

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
        tree = random_tree_mask(case.T, g, batch=case.B if case.tree == "batch" else None).to(device)
    lens = None
    if case.padded:
        lens = torch.randint(case.T, case.S + 1, (case.B,), generator=g)
        lens[0] = case.S
        lens = lens.to(device)
        for b in range(case.B):  # padding must never reach the result: poison it
            k[b, :, int(lens[b]) :] = float("nan")
            v[b, :, int(lens[b]) :] = float("nan")
    return q, k, v, tree, lens


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
