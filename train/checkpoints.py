"""Checkpoints of a training run: the DeepSpeed state, `Progress` (step, token counts, metrics so far) and every
rank's RNG state, under RUN/checkpoints with `run.json` saying which inputs they belong to and how far that run got."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medusa_toolkit import distributed as D
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.run_dir import RunDir

KEEP_CHECKPOINTS = 2


class CheckpointError(ToolkitError, ValueError):
    """Checkpoints that cannot be resumed or must not be discarded silently; the message says what to pass."""


@dataclass
class Progress:
    """Where training is and what it measured so far. Checkpointed whole, so a resumed run's summary (tokens,
    tokens/s, metrics history) equals an uninterrupted run's."""

    step: int = 0
    tokens: int = 0  # sequence tokens of the training batches, all ranks
    target_tokens: int = 0  # positions with a head-0 target (trained tokens), all ranks
    train_time_s: float = 0.0  # seconds inside training steps, summed over runs (not loading, not evaluation)
    epoch_time_s: list[float] = field(default_factory=list)  # the same, per epoch (an epoch: len(train) sequences)
    history: list[dict] = field(default_factory=list)
    window: list[list[float]] | None = None  # per-head stats since the last log line, summed over ranks
    window_tokens: int = 0
    window_time_s: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    # This rank's counts since the last sync (not checkpointed: a checkpoint syncs first).
    pending: torch.Tensor | None = field(default=None, repr=False)
    pending_tokens: int = 0

    def add(self, stats: torch.Tensor, tokens: int, seconds: float) -> None:
        self.pending = stats.detach().clone() if self.pending is None else self.pending + stats.detach()
        self.pending_tokens += tokens
        self.train_time_s += seconds
        self.window_time_s += seconds

    def sync(self) -> None:
        """Fold every rank's pending counts into the totals (a collective: all ranks call it at the same steps)."""
        if self.pending is None:
            return
        stats = D.all_reduce_sum(self.pending.clone())
        tokens = int(D.all_reduce_sum(torch.tensor([self.pending_tokens], dtype=torch.float64))[0])
        self.window = stats.tolist() if self.window is None else (torch.tensor(self.window) + stats.cpu()).tolist()
        self.window_tokens += tokens
        self.tokens += tokens
        self.target_tokens += int(stats[0, 1])
        self.pending, self.pending_tokens = None, 0

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("pending", "pending_tokens")}


RUN_FILE = "run.json"  # in checkpoints/: which config the checkpoints belong to and how far that run got


def save_checkpoint(engine, run_dir: Path, progress: Progress, digest: str, total_steps: int) -> None:
    """DeepSpeed checkpoint + Progress + every rank's RNG state; keep the newest KEEP_CHECKPOINTS."""
    from safetensors.torch import save_file

    progress.sync()
    ckpt = RunDir(run_dir).checkpoints
    tag = f"step-{progress.step:07d}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"progress": progress.state(), "config_hash": digest})
    save_file({"cpu": torch.get_rng_state()}, str(ckpt / tag / f"rng-rank{D.rank()}.safetensors"))
    D.barrier()
    if D.is_main():
        old = sorted(p for p in ckpt.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        info = {"config_hash": digest, "step": progress.step, "total_steps": total_steps}
        (ckpt / RUN_FILE).write_text(json.dumps(info) + "\n")
    D.barrier()


def load_checkpoint(engine, run_dir: Path, digest: str) -> Progress | None:
    """Restore the latest checkpoint; None when there is none."""
    from safetensors.torch import load_file

    ckpt = RunDir(run_dir).checkpoints
    if not (ckpt / "latest").is_file():
        return None
    path, state = engine.load_checkpoint(str(ckpt))
    if path is None:
        return None
    if state.get("config_hash") != digest:
        raise CheckpointError(
            f"the checkpoint in {ckpt} was written by another config (hash {state.get('config_hash')} vs {digest}); "
            "rerun without --resume to start over, or use the original config"
        )
    tag = (ckpt / "latest").read_text().strip()
    rng = ckpt / tag / f"rng-rank{D.rank()}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["cpu"])
    return Progress(**state["progress"])


def check_checkpoints(run_dir: Path, digest: str, resume: bool) -> None:
    """Before a fresh (not --resume) run: refuse to silently discard an interrupted run of this same config; drop
    checkpoints of other configs or of finished runs (they can never be resumed by this config)."""
    ckpt = RunDir(run_dir).checkpoints
    if resume or not ckpt.exists():
        return
    try:
        info = json.loads((ckpt / RUN_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("config_hash") == digest and info.get("step", 0) < info.get("total_steps", 0):
        raise CheckpointError(
            f"{ckpt} holds an interrupted training run of this config (step {info['step']} of "
            f"{info['total_steps']}): pass --resume to continue it, or --force to discard it and start over"
        )
    D.barrier()
    if D.is_main():
        shutil.rmtree(ckpt)  # another config's or a finished run's: never resumable by this config
    D.barrier()
