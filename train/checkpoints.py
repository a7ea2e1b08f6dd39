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


RUN_FILE = "run.json"  # in checkpoints/: which inputs the checkpoints belong to and how far that run got


def save_checkpoint(
    engine, folder: Path, progress: Progress, digest: str, total_steps: int, settings: dict | None = None
) -> None:
    """DeepSpeed checkpoint + Progress + every rank's RNG state; keep the newest KEEP_CHECKPOINTS. `digest` (the train
    stage's input digest) and `settings` (what it covers) are recorded, so a later run knows whose checkpoints they are."""
    from safetensors.torch import save_file

    progress.sync()
    folder = Path(folder)
    tag = f"step-{progress.step:07d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"progress": progress.state(), "config_hash": digest})
    save_file({"cpu": torch.get_rng_state()}, str(folder / tag / f"rng-rank{D.rank()}.safetensors"))
    D.barrier()
    if D.is_main():
        old = sorted(p for p in folder.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        write_run_info(folder, digest, progress.step, total_steps, settings)
    D.barrier()


def write_run_info(folder: Path, digest: str, step: int, total_steps: int, settings: dict | None) -> None:
    """checkpoints/run.json: whose checkpoints these are and how far that run got (step == total_steps: finished)."""
    info = {"config_hash": digest, "step": step, "total_steps": total_steps, "settings": settings}
    (Path(folder) / RUN_FILE).write_text(json.dumps(info) + "\n")


def load_checkpoint(engine, folder: Path, digest: str) -> Progress | None:
    """Restore the latest checkpoint; None when there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "latest").is_file():
        return None
    path, state = engine.load_checkpoint(str(folder))
    if path is None:
        return None
    if state.get("config_hash") != digest:
        raise CheckpointError(
            f"the checkpoint in {folder} was written by another config (hash {state.get('config_hash')} vs {digest}); "
            "rerun without --resume to start over, or use the original config"
        )
    tag = (folder / "latest").read_text().strip()
    rng = folder / tag / f"rng-rank{D.rank()}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["cpu"])
    return Progress(**state["progress"])


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: dict | None, new: dict | None, limit: int = 4) -> str:
    """What changed between two recorded settings, as `key: old -> new` (the first few)."""
    if not old:
        return "its settings were not recorded"
    a, b = _flat(old), _flat(new or {})
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not changed:
        return "the same settings, other inputs (data or base model)"
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def check_checkpoints(
    folder: Path, digest: str, settings: dict | None, resume: bool, force: bool = False, log=print
) -> None:
    """Before a fresh (not --resume) run: an interrupted run's checkpoints are never discarded silently, whatever
    config wrote them (this one: pass --resume or --force; another: the message says what changed, --force discards
    them). A finished run's checkpoints can never be resumed, so they are removed, and the log says so."""
    folder = Path(folder)
    if resume or not folder.exists():
        return
    try:
        info = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    unfinished = info.get("step", 0) < info.get("total_steps", 0)
    if unfinished and not force:
        where = f"{folder} holds an interrupted training run (step {info['step']} of {info['total_steps']})"
        if info.get("config_hash") == digest:
            raise CheckpointError(f"{where} of this config: pass --resume to continue it, or --force to discard it "
                                  "and start over")  # fmt: skip
        raise CheckpointError(
            f"{where} of other settings ({settings_diff(info.get('settings'), settings)}): pass --force to discard "
            "it and train with these settings, or rerun with its settings and --resume"
        )
    D.barrier()
    if D.is_main():
        shutil.rmtree(folder)  # never resumable by this run
        why = "--force" if unfinished else "a finished run's, never resumed"
        log(f"[train] removed the checkpoints in {folder} ({why})")
    D.barrier()
