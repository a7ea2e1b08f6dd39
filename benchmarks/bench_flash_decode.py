"""Benchmark flash_decode against torch SDPA, FlexAttention and flash-attn's flash_attn_with_kvcache.

Measures time per call and achieved memory bandwidth (bytes of K/V read / time) for Medusa-style decoding: T new
tokens (1 = plain decoding, 16/64 = tree verification) attending to a cache of S keys, Llama-7B-like heads by default
(32 query heads, 8 kv heads, head dim 128, bf16). Needs a CUDA GPU.

    python benchmarks/bench_flash_decode.py                       # the full grid
    python benchmarks/bench_flash_decode.py --seq-lens 4096 --tree-sizes 1 16 --batch-sizes 1

flash_attn_with_kvcache has no tree masks: it is timed with causal=True (a chain), which reads the same bytes, so
its number is a speed reference, not an equivalent computation. For the budgeted all-in-one GPU run (correctness vs
float64, bandwidth as % of a measured copy, split and tile sweeps, end-to-end decoding) use `make gpu-check`
(benchmarks/gpu_check.py); this script is the open-ended grid.
"""

import argparse
import sys

import torch

from medusa_toolkit.testing.trees import random_tree_mask

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072], help="cache sizes S")
    p.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 64], help="new tokens T")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes B")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--num-splits", type=int, default=None, help="force the kernel's split count (default: heuristic)")
    p.add_argument("--methods", nargs="+", default=["flash_decode", "sdpa", "flex", "flash_attn"])
    p.add_argument("--no-check", action="store_true", help="skip comparing every method's output to flash_decode")
    return p.parse_args(argv)


def make_methods(names: list[str], q, k, v, tree_mask, num_splits):
    """name -> zero-argument callable returning [B, Hq, T, D]; setup (masks, compilation) happens here, untimed."""
    from medusa_toolkit.kernels.flash_decode import dense_attention_mask, flash_decode

    B, Hq, T, D = q.shape
    S = k.shape[2]
    methods = {}
    if "flash_decode" in names:
        methods["flash_decode"] = lambda: flash_decode(q, k, v, tree_mask, num_splits=num_splits, backend="triton")
    if "sdpa" in names:
        # T == 1 needs no mask, which lets SDPA pick its fastest kernel; trees need the dense [B, 1, T, S] mask.
        mask = None if T == 1 else dense_attention_mask(T, S, tree_mask, batch=B, device=q.device)[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        methods["sdpa"] = lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    if "flex" in names:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            print("  (FlexAttention unavailable in this torch)")
        else:
            allowed = dense_attention_mask(T, S, tree_mask, batch=B, device=q.device)

            def mask_mod(b, h, q_idx, kv_idx):
                return allowed[b, q_idx, kv_idx]

            block_mask = create_block_mask(mask_mod, B, None, T, S, device=q.device)
            flex = torch.compile(flex_attention, dynamic=False)
            methods["flex"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    if "flash_attn" in names:
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            print("  (flash-attn not installed: skipping flash_attn_with_kvcache)")
        else:
            # flash-attn wants [B, L, H, D]; the cache copy is made once, outside the timing.
            q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            methods["flash_attn"] = lambda: flash_attn_with_kvcache(q_t, k_t, v_t, causal=True).transpose(1, 2)
    return methods


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_flash_decode.py needs a CUDA GPU (none found): nothing to measure on this machine.")
    import triton.testing

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()} | {args.dtype} | Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim}")
    header = f"{'B':>3} {'T':>4} {'S':>7} | " + " | ".join(f"{m:>22}" for m in args.methods) + " | speedup vs others"
    print(header)
    print("-" * len(header))
    for B in args.batch_sizes:
        for T in args.tree_sizes:
            for S in args.seq_lens:
                if T > S:
                    continue
                torch.manual_seed(0)
                q = torch.randn(B, args.q_heads, T, args.head_dim, device=device, dtype=dtype)
                k = torch.randn(B, args.kv_heads, S, args.head_dim, device=device, dtype=dtype)
                v = torch.randn_like(k)
                tree_mask = random_tree_mask(T, torch.Generator().manual_seed(0), batch=B).to(device) if T > 1 else None
                try:
                    methods = make_methods(args.methods, q, k, v, tree_mask, args.num_splits)
                except torch.OutOfMemoryError:
                    print(f"{B:>3} {T:>4} {S:>7} | out of memory")
                    continue
                kv_bytes = 2 * k.numel() * k.element_size()
                times = {}
                reference = methods["flash_decode"]() if "flash_decode" in methods else None
                for name, fn in methods.items():
                    try:
                        out = fn()
                        if reference is not None and not args.no_check and name != "flash_attn":
                            err = (out.float() - reference.float()).abs().max().item()
                            if err > 5e-2:
                                print(f"  warning: {name} differs from flash_decode by {err:.3g} at B={B} T={T} S={S}")
                        times[name] = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e-3
                    except Exception as e:  # one failing baseline should not kill the whole table
                        print(f"  {name} failed at B={B} T={T} S={S}: {type(e).__name__}: {e}")
                cells = []
                for name in args.methods:
                    t = times.get(name)
                    cells.append(f"{t * 1e6:>9.1f}us {kv_bytes / t / 1e9:>7.0f}GB/s" if t else f"{'-':>22}")
                ratios = ""
                if "flash_decode" in times:
                    mine = times["flash_decode"]
                    ratios = " ".join(f"{n}:{t / mine:.2f}x" for n, t in times.items() if n != "flash_decode")
                print(f"{B:>3} {T:>4} {S:>7} | " + " | ".join(cells) + f" | {ratios}")
                del q, k, v, methods
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
