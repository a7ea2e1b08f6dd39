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

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_toolkit.decoding.generate import DecodeState, Greedy, decode_step, prefill, use_attention
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning import TuneError

LATENCY_GRID = (1, 2, 4, 8, 16, 32, 48, 64)
# Repeats whose interquartile range exceeds this share of the median are too noisy to choose a tree on.
NOISY_SPREAD = 0.15
PROFILE_KIND = "medusa-toolkit latency profile"


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


# ----------------------------------------------------------------------------------------------------------------------
# Latency profiles: the curve of one machine, for tuning elsewhere


def model_signature(model: MedusaModel) -> dict[str, Any]:
    """What a step's cost depends on besides the machine: the base's shape, dtype, attention, compilation, heads."""
    c = model.base.config
    return {
        "model_type": getattr(c, "model_type", None), "hidden_size": getattr(c, "hidden_size", None),
        "num_hidden_layers": getattr(c, "num_hidden_layers", None), "vocab_size": getattr(c, "vocab_size", None),
        "dtype": str(model.dtype).removeprefix("torch."), "compiled": bool(model.compiled),
        "num_heads": model.num_heads, "head_type": model.heads.head_type if model.heads is not None else None,
    }  # fmt: skip


@dataclass
class LatencyProfile:
    """Seconds per decoding step by node budget, measured on `machine` for a model of `signature`."""

    nodes: list[int]
    step_time_s: list[float]
    spread: list[float]
    machine: dict[str, Any]
    signature: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # attention, batch size, prefix length, repeats
    kind: str = PROFILE_KIND

    def latency(self) -> dict[int, float]:
        return dict(zip(self.nodes, self.step_time_s))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TuneError(
                f"latency profile not found: {path}; measure one with medusa-tune-tree --profile-latency"
            ) from None
        except (OSError, ValueError) as e:
            raise TuneError(f"{path} is not a latency profile ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise TuneError(f"{path} is not a latency profile (made by medusa-tune-tree --profile-latency)")
        try:
            profile = cls(**data)
            ok = len(profile.nodes) == len(profile.step_time_s) > 0 and all(t > 0 for t in profile.step_time_s)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TuneError(f"{path}: a latency profile needs matching, positive nodes and step_time_s lists")
        return profile

    def check_fits(self, model: MedusaModel, source: str) -> None:
        """A profile tunes only the model it was measured for (shape, dtype, compilation, heads)."""
        mine = model_signature(model)
        differ = [
            f"{k}: profile {self.signature.get(k)!r}, here {v!r}" for k, v in mine.items() if self.signature.get(k) != v
        ]
        if differ:
            raise TuneError(f"{source} was measured for another model or setup ({'; '.join(differ)}); measure it "
                            "with the same base, heads, dtype and model.compile")  # fmt: skip


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
