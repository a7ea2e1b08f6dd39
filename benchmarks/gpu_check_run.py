"""gpu_check.py's bookkeeping and setup, shared by every section: the run (progress lines, time budget, JSON after
every section), importing the checkout without installing it, the problem sizes, timing helpers."""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
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
    step_tree_sizes: tuple  # the step section's tree sizes (nodes)
    step_dtype: str
    step_compile: bool  # False: the dry run times the eager step twice (a tiny compile costs a minute on 2 cores)
    step_repeats: int


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
    step_tree_sizes=(1, 2, 4, 8, 16, 32),
    step_dtype="bfloat16",
    step_compile=True,
    step_repeats=10,
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
    step_tree_sizes=(1, 4),
    step_dtype="float32",
    step_compile=False,
    step_repeats=2,
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
