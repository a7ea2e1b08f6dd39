"""Tree timing: how long one Medusa step takes on this device for each node budget.

The timed step is `medusa_toolkit.decoding.generate.decode_step` itself (propose, the tree forward with its mask, acceptance,
cache compaction, the heads at the accepted node) at a representative KV length and batch size; after each repeat the
cache is cut back to the prefix, so every repeat sees the same length.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_toolkit.decoding.generate import DecodeState, Greedy, decode_step, prefill, use_attention
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree

LATENCY_GRID = (1, 2, 4, 8, 16, 32, 48, 64)


def device_name(device: torch.device) -> str:
    """Human-readable accelerator or CPU name, with the thread count for CPUs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_grid(max_nodes: int, grid: tuple[int, ...] | list[int] = LATENCY_GRID) -> list[int]:
    """The budgets to time: the grid points up to max_nodes, plus 1 and max_nodes themselves."""
    return sorted({1, max_nodes, *(g for g in grid if g <= max_nodes)})


@torch.inference_mode()
def measure_step_times(
    model: MedusaModel,
    trees: dict[int, MedusaTree],
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    progress: bool = True,
) -> dict[int, float]:
    """Median wall time (s) of one decoding step for each tree, with `batch_size` rows of `prefix_length` cached
    tokens."""
    device = model.device
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.base.config.vocab_size, (batch_size, prefix_length), generator=gen).to(device)
    depth = max(t.depth for t in trees.values())
    times: dict[int, float] = {}
    with use_attention(model, attn) as attn_name:
        start = prefill(model, prefix, None, depth, Greedy())
        lens = start.cache.lens.clone()
        bar = tqdm(trees.items(), desc="latency", unit="budget", disable=not progress)
        for n, tree in bar:
            buffers = tree.buffers(device)
            samples = []
            for i in range(warmup + repeats):
                state = DecodeState(start.cache, start.roots, start.medusa_logits[: tree.depth])
                sync(device)
                t0 = time.perf_counter()
                decode_step(model, state, tree, buffers, attn_name, Greedy())
                sync(device)
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
                start.cache.set_lens(lens)  # back to the prefix for the next repeat
            times[n] = float(np.median(samples))
            bar.set_postfix(nodes=n, ms=f"{1e3 * times[n]:.1f}")
    return times
