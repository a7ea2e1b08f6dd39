"""The stage runner: config -> data -> train -> tree -> verify -> export, each stage an artefact folder in the run dir.

A stage is one function `run_<stage>(cfg, run_dir, out_dir) -> None` that writes its artefact into `out_dir` (a
temp folder); the runner then writes `manifest.json` (hash of the stage's inputs) and renames the folder into place,
so a killed stage never leaves a half artefact. A stage whose manifest matches its inputs is skipped ("cached").
Adding a stage = one function + one registry entry + one config section.

Under a launcher (deepspeed, torchrun) every rank calls every stage function; only rank 0 writes the manifest and
renames, and all ranks meet at a barrier afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.version import __version__

MANIFEST = "manifest.json"
# Config keys that steer how a stage runs but not what it produces; they never invalidate a cached artefact.
NOT_INPUTS = {("train", "resume")}


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported lazily so toolkit never imports train/verify/export at import time
    sections: tuple[str, ...]  # config sections whose values are this stage's inputs
    after: tuple[str, ...]  # earlier stages whose artefacts it reads when present (their hashes feed its own)
    requires: tuple[str, ...] = ()  # earlier stages whose artefacts it cannot run without
    folder: str | None = None  # artefact folder in the run dir when it differs from the stage name

    @property
    def artefact(self) -> str:
        return self.folder or self.name

    def function(self) -> Callable[[ToolkitConfig, Path, Path], None]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("data", "medusa_toolkit.train.data:run_data", ("model", "data"), ()),
        Stage(
            "train",
            "medusa_toolkit.train.trainer:run_train",
            ("model", "heads", "train"),
            ("data",),
            ("data",),
            "heads",
        ),
        Stage("tree", "medusa_toolkit.verify.tune_tree:run_tree", ("model", "tree"), ("data", "train"), ("train",)),
        Stage(
            "verify", "medusa_toolkit.verify.verifier:run_verify", ("model", "verify"), ("train", "tree"), ("train",)
        ),
        Stage(
            "export",
            "medusa_toolkit.export.stage:run_export",
            ("model", "export"),
            ("train", "tree", "verify"),
            ("train",),
        ),
    )
}


class StageError(ToolkitError, RuntimeError):
    """A stage cannot run (e.g. an earlier artefact is missing); the message says which stage to run first."""


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def input_hash(cfg: ToolkitConfig, stage: Stage, run_dir: Path) -> str:
    """Hash of everything a stage's output depends on: its config sections and its upstream artefacts' hashes."""
    cfg_dict = asdict(cfg)
    for section, key in NOT_INPUTS:
        cfg_dict[section].pop(key, None)
    upstream = {}
    for name in stage.after:
        manifest = read_manifest(run_dir / STAGES[name].artefact)
        upstream[name] = manifest["input_hash"] if manifest else None
    payload = {
        "stage": stage.name,
        "sections": {s: cfg_dict[s] for s in stage.sections},
        "upstream": upstream,
        "toolkit_version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def is_cached(cfg: ToolkitConfig, stage: Stage, run_dir: Path) -> bool:
    manifest = read_manifest(run_dir / stage.artefact)
    return manifest is not None and manifest.get("input_hash") == input_hash(cfg, stage, run_dir)


def run_stage(cfg: ToolkitConfig, name: str, run_dir: str | Path, force: bool = False, log: Callable = print) -> Path:
    """Run one stage (or reuse its artefact); return its artefact folder (`run_dir/name`; `run_dir/heads` for train)."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    stage = STAGES[name]
    run_dir = Path(run_dir)
    final = run_dir / stage.artefact
    if not force and is_cached(cfg, stage, run_dir):
        if _rank() == 0:
            log(f"[{name}] cached: {final}")
        return final
    for dep in stage.requires:
        if read_manifest(run_dir / STAGES[dep].artefact) is None:
            raise StageError(f"stage '{name}' needs the '{dep}' artefact in {run_dir}; run stage '{dep}' first")
    digest = input_hash(cfg, stage, run_dir)
    # Same name on every rank (no mkdtemp): ranks may all write their share into it.
    tmp = run_dir / f".{name}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    start = time.time()
    stage.function()(cfg, run_dir, tmp)
    _barrier()
    if _rank() == 0:
        manifest = {
            "stage": name,
            "input_hash": digest,
            "toolkit_version": __version__,
            "wall_time_s": time.time() - start,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        log(f"[{name}] done in {time.time() - start:.1f}s: {final}")
    _barrier()
    return final


def run_pipeline(
    cfg: ToolkitConfig, run_dir: str | Path, stages: list[str] | None = None, force: bool = False, log: Callable = print
) -> dict[str, Path]:
    """Run the configured stages in pipeline order; return each stage's artefact folder."""
    wanted = stages if stages is not None else cfg.stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    run_dir = Path(run_dir)
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.resolved.yaml").write_text(cfg.to_yaml())
    _barrier()
    return {name: run_stage(cfg, name, run_dir, force=force, log=log) for name in STAGES if name in wanted}
