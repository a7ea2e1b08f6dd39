"""gpu_check.py section `compile`: every kernel variant the dispatcher can choose, JIT-compiled in parallel worker
processes into Triton's on-disk cache."""

from __future__ import annotations

import time

from gpu_check_run import Run, Sizes, ensure_importable


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
    from medusa_toolkit.tuning.timing import sync

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
