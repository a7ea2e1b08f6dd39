"""gpu_check.py section b, `speed`, `splits` and `tiles`: flash_decode vs SDPA vs flash-attn in us per call and in
% of the device's copy bandwidth; forced split counts and tile sizes around the dispatcher's choices."""

from __future__ import annotations

import functools
import math
import time

from gpu_check_run import Run, Sizes, bench


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
    from medusa_toolkit.testing.trees import random_tree_mask

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
    tree = random_tree_mask(T, g, batch=B).to(device) if T > 1 else None
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
    from medusa_toolkit.testing.trees import random_tree_mask

    Hq, Hkv, D = heads
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    q = torch.randn(B, Hq, T, D, device=device, dtype=dt)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dt)
    v = torch.randn_like(k)
    tree = pack_tree_mask(random_tree_mask(T, torch.Generator().manual_seed(1)).to(device)) if T > 1 else None
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
    from medusa_toolkit.testing.trees import random_tree_mask

    Hq, Hkv, D = sizes.speed_heads
    dt = torch.bfloat16
    S = 32768 if device.type == "cuda" else 256
    rows = []
    for T in (1, 64) if device.type == "cuda" else (4,):
        q = torch.randn(1, Hq, T, D, device=device, dtype=dt)
        k = torch.randn(1, Hkv, S, D, device=device, dtype=dt)
        v = torch.randn_like(k)
        tree = pack_tree_mask(random_tree_mask(T, torch.Generator().manual_seed(2)).to(device)) if T > 1 else None
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
