"""Tree timing: how long one Medusa step takes for each node budget, here or on the machine a latency profile names.

The timed step is `medusa_toolkit.decoding.generate.decode_step` itself (propose, the tree forward with its mask,
acceptance, cache compaction, the heads at the accepted node; compiled where the model decodes compiled) at a
representative KV length and batch size; after each repeat the cache is cut back to the prefix, so every repeat sees
the same length. Repeats are interleaved (one step of every budget per round), so a load that comes and goes hits
every budget alike; the spread between repeats is kept, and a warning says when it is too wide to choose on.

A latency profile (`medusa-tune-tree --profile-latency OUT.json`) is that curve measured on one machine, saved with
what it was measured for, so a tree can be tuned here for a machine measured elsewhere (`tree.latency_profile`).
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_toolkit.decoding.generate import DecodeState, Greedy, decode_step, prefill, use_attention
from medusa_toolkit.decoding.latency_profile import LatencyProfile, model_signature  # noqa: F401 (re-exported)
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree

LATENCY_GRID = (1, 2, 4, 8, 16, 32, 48, 64)
# Repeats whose interquartile range exceeds this share of the median are too noisy to choose a tree on.
NOISY_SPREAD = 0.15


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


@dataclass
class StepTimes:
    """Median seconds per step for each budget, and the spread of the repeats (interquartile range / median)."""

    median: dict[int, float]
    spread: dict[int, float]

    @property
    def noisy(self) -> bool:
        return max(self.spread.values(), default=0.0) > NOISY_SPREAD


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
) -> StepTimes:
    """Seconds of one decoding step for each tree, with `batch_size` rows of `prefix_length` cached tokens; rounds
    of one step per tree, `warmup` rounds untimed (they also pay a compiled step's first compile)."""
    device = model.device
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.base.config.vocab_size, (batch_size, prefix_length), generator=gen).to(device)
    depth = max(t.depth for t in trees.values())
    samples: dict[int, list[float]] = {n: [] for n in trees}
    with use_attention(model, attn) as attn_name:
        start = prefill(model, prefix, None, depth, Greedy())
        lens = start.cache.lens.clone()
        buffers = {n: tree.buffers(device) for n, tree in trees.items()}
        for i in tqdm(range(warmup + repeats), desc="latency", unit="round", disable=not progress):
            for n, tree in trees.items():
                state = DecodeState(start.cache, start.roots, start.medusa_logits[: tree.depth])
                sync(device)
                t0 = time.perf_counter()
                decode_step(model, state, tree, buffers[n], attn_name, Greedy())
                sync(device)
                if i >= warmup:
                    samples[n].append(time.perf_counter() - t0)
                start.cache.set_lens(lens)  # back to the prefix for the next step
    median = {n: float(np.median(s)) for n, s in samples.items()}
    spread = {n: float(np.subtract(*np.percentile(s, [75, 25])) / median[n]) if median[n] else 0.0
              for n, s in samples.items()}  # fmt: skip
    times = StepTimes(median, spread)
    if times.noisy:
        worst = max(times.spread, key=times.spread.get)
        warnings.warn(
            f"step timings vary by {100 * times.spread[worst]:.0f}% between repeats ({worst} nodes): the machine is "
            "busy, and the tree chosen from them may be wrong; time on an idle machine, raise tree.latency_repeats, "
            "or tune from a profile measured there (tree.latency_profile)",
            stacklevel=2,
        )
    return times


def profile_trees(num_heads: int, budgets: list[int]) -> dict[int, MedusaTree]:
    """A tree per budget, as deep as the heads allow (a chain, then more candidates at the root): the heads' cost
    grows with depth for per-head projections, so a profile never predicts a deep tree too fast."""
    trees = {}
    for n in budgets:
        depth = min(num_heads, n - 1)
        chain = [[0] * d for d in range(1, depth + 1)]
        wide = [[r] for r in range(1, n - depth)]
        trees[n] = MedusaTree.from_paths(chain + wide, name=f"profile-{n}")
    return trees


def profile_latency(
    model: MedusaModel,
    max_nodes: int,
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    repeats: int = 5,
    progress: bool = True,
) -> LatencyProfile:
    """Measure this machine's step-time curve for `model` (every grid budget up to max_nodes)."""
    budgets = latency_grid(max_nodes)
    times = measure_step_times(model, profile_trees(model.num_heads, budgets), prefix_length, batch_size, attn,
                               repeats, progress=progress)  # fmt: skip
    machine = {"device": device_name(model.device), "type": model.device.type, "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "measured": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    return LatencyProfile(
        budgets, [times.median[n] for n in budgets], [times.spread[n] for n in budgets], machine,
        model_signature(model), {"attn_implementation": attn or "sdpa", "batch_size": batch_size,
                                 "prefix_length": prefix_length, "repeats": repeats},
    )  # fmt: skip
