"""The stage runner: config -> data -> train -> tree -> verify -> export, each stage an artefact folder in the run dir.

A stage is one function `run_<stage>(run: StageRun) -> None` that writes its artefact into `run.out` (a temp folder);
the runner then writes `manifest.json` and renames the folder into place, so a killed stage never leaves a half
artefact (and its temp folder is removed). The manifest holds

- `input_hash`: the stage's config sections, the CONTENT of every file they name (prompt files, tree files, the
  DeepSpeed JSON, initial heads, a local base model) and the content hash of every upstream artefact it reads;
- `files`: the sha256 of every file the stage wrote, and `artefact_hash`, their hash.

A stage is "cached" only when its input hash matches AND its files on disk are still the bytes it wrote, so editing a
prompts file, a tree file or an artefact reruns exactly the stages it affects. The runner never deletes a file it did
not write: replacing an artefact folder that holds foreign files is refused. The stage gets its input hash
(`run.digest`) and what it covers (`run.inputs`): a stage that keeps state across runs (the data stage's finished
shards, training checkpoints, the teacher cache) keys it on them instead of recomputing them.

Under a launcher (deepspeed, torchrun) every rank calls every stage function; only rank 0 writes the manifest and
renames, and all ranks meet at a barrier afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medusa_toolkit import distributed as D
from medusa_toolkit import entry_points
from medusa_toolkit.config import ConfigError, ToolkitConfig
from medusa_toolkit.digest import digest_of, folder_files, path_digest
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.run_dir import RunDir, RunLock, RunLockError
from medusa_toolkit.version import __version__

MANIFEST = "manifest.json"
# Config keys that steer how a stage runs but not what it produces; they never invalidate a cached artefact.
NOT_INPUTS = {("train", "resume"), ("train", "teacher_cache"), ("logging", "progress")}


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function" (medusa_toolkit.entry_points), imported when the stage runs
    sections: tuple[str, ...]  # config sections whose values are this stage's inputs
    after: tuple[str, ...]  # earlier stages whose artefacts it reads when present (their hashes feed its own)
    requires: tuple[str, ...] = ()  # earlier stages whose artefacts it cannot run without

    def function(self) -> Callable[[StageRun], None]:
        return entry_points.load(self.target)


FUNCTIONS = entry_points.STAGE_FUNCTIONS
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("data", FUNCTIONS["data"], ("model", "data"), ()),
        Stage("train", FUNCTIONS["train"], ("model", "heads", "train"), ("data",), ("data",)),
        Stage("tree", FUNCTIONS["tree"], ("model", "data", "tree"), ("data", "train"), ("train",)),
        Stage("verify", FUNCTIONS["verify"], ("model", "data", "verify", "tree"), ("train", "tree"), ("train",)),
        Stage("export", FUNCTIONS["export"], ("model", "export"), ("train", "tree", "verify"), ("train",)),
    )
}  # fmt: skip


@dataclass(frozen=True)
class StageRun:
    """What a stage function gets: the config, the run directory, the folder to write its artefact into, its input
    hash and what that hash covers (`inputs`: config sections, named files, base, upstream artefacts)."""

    cfg: ToolkitConfig
    dirs: RunDir
    out: Path
    digest: str
    inputs: dict
    token: str = "0"  # this run's name for temp files (the run lock's token): no two processes share one
    force: bool = False  # --force: the user asked to discard what the stage would otherwise refuse to (checkpoints)

    @classmethod
    def prepare(
        cls, cfg: ToolkitConfig, run_dir: str | Path, stage: str, out: str | Path | None = None, token: str | None = None,
        force: bool = False,
    ) -> StageRun:  # fmt: skip
        """The StageRun the runner would pass (tests and benchmarks call a stage function directly with it)."""
        dirs = RunDir(run_dir)
        inputs = stage_inputs(cfg, STAGES[stage], dirs)
        out = Path(out) if out is not None else dirs.artefact(stage)
        return cls(cfg, dirs, out, digest_of(inputs), inputs, token or str(os.getpid()), force)


class StageError(ToolkitError, RuntimeError):
    """A stage cannot run (e.g. an earlier artefact is missing); the message says which stage to run first."""


# ----------------------------------------------------------------------------------------------------------------------
# What a stage reads


def is_file_spec(spec: str | None) -> bool:
    """A config value that names a file (a tree.json, a prompts file) rather than a preset or a named set."""
    return bool(spec) and (Path(spec).suffix != "" or "/" in spec or Path(spec).exists())


def named_files(cfg: ToolkitConfig, stage: str) -> dict[str, str]:
    """{config key: path} of the files (and folders) a stage's config names; their content is part of its inputs."""
    d, t, v = cfg.data, cfg.train, cfg.verify
    candidates = {
        "data": {f"data.sources[{i}].path": src.path for i, src in enumerate(d.sources) if src.path},
        "train": {"train.deepspeed.config_file": t.deepspeed.config_file, "heads.init_from": cfg.heads.init_from},
        "tree": {
            "tree.tree": cfg.tree.tree if cfg.tree.tree != "auto" else None,
            "tree.prompts": cfg.tree.prompts,
            "tree.latency_profile": cfg.tree.latency_profile,
        },
        "verify": {"verify.tree": v.tree, "verify.prompts": v.prompts, "tree.tree": cfg.tree.tree},
        "export": {},
    }[stage]
    out = {}
    for key, spec in candidates.items():
        if spec and is_file_spec(spec) and Path(spec).expanduser().exists():
            out[key] = str(Path(spec).expanduser())
    return out


def stage_inputs(cfg: ToolkitConfig, stage: Stage, run: RunDir) -> dict:
    """Everything a stage's output depends on: config sections, named files' content, upstream artefacts."""
    from medusa_toolkit.model.base_model import base_identity, resolve_generation_dtype

    cfg_dict = cfg.to_dict()
    for section, key in NOT_INPUTS:
        cfg_dict[section].pop(key, None)
    upstream = {}
    for name in stage.after:
        folder = run.artefact(name)
        manifest = read_manifest(folder)
        if manifest:
            upstream[name] = manifest.get("artefact_hash")
        else:  # made outside the stages (or absent): its content, so that nothing keyed on it is reused stale
            upstream[name] = f"content:{path_digest(folder)}" if folder.is_dir() else None
    return {
        "stage": stage.name,
        "sections": {s: cfg_dict[s] for s in stage.sections},
        "files": {key: path_digest(path) for key, path in named_files(cfg, stage.name).items()},
        "base_model": base_identity(cfg.model.name_or_path),
        # What `auto` resolved to on this machine: data generated in bf16 is not the float32 data.
        "generation_dtype": resolve_generation_dtype(cfg.data.generation_dtype, cfg.model.dtype),
        "upstream": upstream,
        "toolkit_version": __version__,
    }


def input_digest(cfg: ToolkitConfig, stage: Stage, run_dir: str | Path) -> str:
    """The hash of `stage_inputs`: a manifest's `input_hash`."""
    return digest_of(stage_inputs(cfg, stage, RunDir(run_dir)))


# ----------------------------------------------------------------------------------------------------------------------
# Manifests


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return manifest if isinstance(manifest, dict) else None


def changed_files(stage_dir: Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are missing or no longer hold the bytes the stage wrote."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return ["(manifest lists no files)"]
    stage_dir = Path(stage_dir)
    changed = []
    for rel, digest in listed.items():
        path = stage_dir / rel
        if not path.is_file() or path_digest(path) != digest:
            changed.append(rel)
    return changed


def foreign_files(stage_dir: Path) -> list[str]:
    """Files in an artefact folder that its manifest does not list: the user's, never to be deleted."""
    manifest = read_manifest(stage_dir)
    listed = set((manifest or {}).get("files") or {})
    present = {p.relative_to(stage_dir).as_posix() for p in Path(stage_dir).rglob("*") if p.is_file()}
    return sorted(present - listed - {MANIFEST})


def upstream_changes(stage: Stage, run: RunDir) -> dict[str, list[str]]:
    """{earlier stage: its files that no longer hold the bytes that stage wrote} for the artefacts `stage` reads."""
    out = {}
    for dep in stage.after:
        manifest = read_manifest(run.artefact(dep))
        changed = changed_files(run.artefact(dep), manifest) if manifest else []
        if changed:
            out[dep] = changed
    return out


def cache_status(cfg: ToolkitConfig, stage: Stage, run_dir: Path) -> tuple[bool, str]:
    """(cached?, why not) for a stage's artefact in run_dir."""
    folder = RunDir(run_dir).artefact(stage.name)
    manifest = read_manifest(folder)
    if manifest is None:
        return False, "no artefact yet"
    if manifest.get("input_hash") != input_digest(cfg, stage, run_dir):
        return False, "inputs changed"
    changed = changed_files(folder, manifest)
    if changed:
        return False, f"artefact files changed on disk since they were written ({', '.join(changed[:3])})"
    return True, ""


def _replace(tmp: Path, final: Path) -> None:
    """Move a finished artefact into place; the folder it replaces may hold only files an earlier run wrote."""
    if final.exists():
        foreign = foreign_files(final)
        if foreign:
            raise StageError(
                f"{final} holds files the toolkit did not write ({', '.join(foreign[:5])}); move them out of the "
                "run directory (the stage replaces this folder) and run again"
            )
        shutil.rmtree(final)
    tmp.rename(final)


# ----------------------------------------------------------------------------------------------------------------------
# Running


def run_stage(
    cfg: ToolkitConfig, name: str, run_dir: str | Path, force: bool = False, log: Callable = print, token: str = "0"
) -> Path:
    """Run one stage (or reuse its artefact); return its artefact folder (`run_dir/name`; `run_dir/heads` for train).

    Before anything runs or is reused: every earlier artefact this stage reads must still hold the bytes its stage
    wrote (a truncated heads file is never verified "cached"), and an artefact folder about to be replaced must hold
    only files the toolkit wrote (a stage never runs for minutes, or publishes, only to refuse at the end).
    """
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    stage = STAGES[name]
    run = RunDir(run_dir)
    final = run.artefact(name)
    for dep, changed in upstream_changes(stage, run).items():
        raise StageError(
            f"the '{dep}' artefact in {run.artefact(dep)} changed on disk since its stage wrote it "
            f"({', '.join(changed[:3])}), so '{name}' will not use it: rerun it (--stages {dep},{name}) or restore "
            "the files"
        )
    cached, why = cache_status(cfg, stage, run.root)
    if cached and not force:
        if D.is_main():
            log(f"[{name}] cached: {final}")
        return final
    for dep in stage.requires:
        if read_manifest(run.artefact(dep)) is None:
            raise StageError(f"stage '{name}' needs the '{dep}' artefact in {run.root}; run stage '{dep}' first")
    foreign = foreign_files(final) if final.is_dir() else []
    if foreign:
        raise StageError(
            f"{final} holds files the toolkit did not write ({', '.join(foreign[:5])}); the '{name}' stage replaces "
            "this folder: move them out of the run directory and run again (nothing was run or changed)"
        )
    if D.is_main() and final.exists() and not force and why:
        log(f"[{name}] rerunning: {why}")
    # One name on every rank (they may all write their share into it), this run's own (the lock's token).
    tmp = run.root / f".{name}.tmp-{token}"
    stage_run = StageRun.prepare(cfg, run.root, name, tmp, token, force)
    if D.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    D.barrier()
    start = time.time()
    try:
        stage.function()(stage_run)
        D.barrier()
        if D.is_main():
            files = folder_files(tmp)
            manifest = {
                "stage": name,
                "input_hash": stage_run.digest,
                "artefact_hash": digest_of(files),
                "files": files,
                "toolkit_version": __version__,
                "wall_time_s": time.time() - start,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace(tmp, final)
            log(f"[{name}] done in {time.time() - start:.1f}s: {final}")
    finally:
        if D.is_main() and tmp.exists():  # a failed or interrupted stage leaves nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    return final


def check_inputs(cfg: ToolkitConfig, stages: list[str], run_dir: str | Path | None = None) -> None:
    """Before the first stage runs: everything the config lets us check, checked — every file it names exists and
    parses, the device exists, the trees fit the heads, the push target is a repo id (the schema), the heads to
    start from agree with the heads configured. Minutes of work must not be spent before a typo is found.
    """
    from medusa_toolkit.model.base_model import check_device, check_model_spec
    from medusa_toolkit.model.tree import check_tree_spec
    from medusa_toolkit.prompts import check_prompt_source

    run = RunDir(run_dir if run_dir is not None else cfg.output_dir)
    if run.root.exists() and not run.root.is_dir():
        raise StageError(f"output_dir {run.root} is a file; pass a directory (--output-dir)")
    check_device(cfg.model.device)
    check_model_spec(cfg.model.name_or_path)
    d, t = cfg.data, cfg.train
    if "data" in stages:
        for src in d.sources:
            check_prompt_source(src.source, src.path, "data")
            if src.system_prompt is not None and src.source != "self":
                raise ConfigError(
                    f"data.sources: system_prompt steers the prompts the model writes itself (source: self), and "
                    f"source {src.source!r} brings its own prompts; drop it there (data.system_prompt sets the one "
                    "every answer is generated with)"
                )
            if not src.regenerate and src.source not in ("chitchat", "conversations"):
                raise ConfigError(
                    f"data.sources: regenerate: false keeps recorded assistant turns, and source {src.source!r} has "
                    "none; use it with chitchat or conversations, or drop it"
                )
        if d.engine == "openai" and any(not src.regenerate for src in d.sources):
            raise ConfigError(
                "data.sources: regenerate: false takes the base's next tokens from a forward pass in this process, "
                "which data.engine: openai does not load; use data.engine: hf for that source"
            )
    if "train" in stages and t.deepspeed.config_file:
        path = Path(t.deepspeed.config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"train.deepspeed.config_file not found: {path}; fix the path or remove the key")
        try:
            ds = json.loads(path.read_text())
            if not isinstance(ds, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(f"train.deepspeed.config_file {path}: not a DeepSpeed JSON object ({e})") from None
        check_deepspeed_optimizer(ds, path)
    if "train" in stages and cfg.heads.init_from:
        spec = cfg.heads.init_from
        if is_file_spec(spec) and not Path(spec).expanduser().exists() and spec.count("/") != 1:
            raise ConfigError(f"heads.init_from not found: {spec}; pass a heads folder or a Hub id ORG/NAME")
        if Path(spec).expanduser().is_dir():
            check_init_from(cfg, Path(spec).expanduser())
    num_heads = cfg.heads.num_heads if "train" in stages else _run_num_heads(run)
    if "tree" in stages:
        check_tree_spec(cfg.tree.tree, "tree.tree", allow_auto=True, num_heads=num_heads)
        if cfg.tree.latency_profile:
            from medusa_toolkit.decoding.latency_profile import LatencyProfile

            LatencyProfile.load(Path(cfg.tree.latency_profile).expanduser())  # exists and parses
        if cfg.tree.tree == "auto" and is_file_spec(cfg.tree.prompts):  # named sets matter only without data rows
            check_prompt_source(cfg.tree.prompts, None, "tree")
    if "verify" in stages:
        if cfg.verify.tree:
            check_tree_spec(cfg.verify.tree, "verify.tree", num_heads=num_heads)
        elif cfg.tree.tree != "auto":  # what verify falls back to
            check_tree_spec(cfg.tree.tree, "tree.tree", num_heads=num_heads)
        check_prompt_source(cfg.verify.prompts, None, "verify")
    if "export" in stages and cfg.export.push_to_hub:
        from medusa_toolkit.model.base_model import base_hub_id

        if not base_hub_id(cfg.export.base_model_id or cfg.model.name_or_path):
            raise ConfigError(
                f"export.push_to_hub needs a Hub id for the base model, but model.name_or_path is "
                f"{cfg.model.name_or_path!r}: set export.base_model_id: ORG/NAME (engines load the base by it)"
            )


def _run_num_heads(run: RunDir) -> int | None:
    """How many heads the run's heads/ hold (None when there are none yet)."""
    try:
        config = json.loads((run.heads / "config.json").read_text())
        n = config.get("medusa_num_heads")
        return n if isinstance(n, int) and not isinstance(n, bool) else None
    except (OSError, ValueError, AttributeError):
        return None


def check_init_from(cfg: ToolkitConfig, folder: Path) -> None:
    """heads.init_from's heads must be the heads configured: a mismatch names both values (the config is not
    silently overridden)."""
    from medusa_toolkit.model.heads_io import read_heads_config

    theirs = read_heads_config(folder)
    h = cfg.heads
    pairs = {"num_heads": ("medusa_num_heads", h.num_heads), "num_layers": ("medusa_num_layers", h.num_layers),
             "head_type": ("head_type", h.head_type)}  # fmt: skip
    conflicts = [
        f"heads.{key} is {mine!r}, {folder} has {theirs[their_key]!r}"
        for key, (their_key, mine) in pairs.items()
        if their_key in theirs and theirs[their_key] != mine
    ]
    if conflicts:
        raise ConfigError(
            f"heads.init_from does not match the heads configured: {'; '.join(conflicts)}. Set heads.* to the "
            "starting heads' values, or start from other heads"
        )


def check_deepspeed_optimizer(ds: dict, path: Path) -> None:
    """The optimizer a DeepSpeed JSON names must be one DeepSpeed builds (its own, or a torch.optim class): DeepSpeed
    itself only says so after the base model has loaded."""
    name = (ds.get("optimizer") or {}).get("type") if isinstance(ds.get("optimizer"), dict) else None
    if name is None:
        return
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if str(name).lower() not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, str(name), None) is None:
        raise ConfigError(
            f"train.deepspeed.config_file {path}: optimizer type {name!r} is not one DeepSpeed knows; use one of "
            f"{', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class name (e.g. AdamW)"
        )


def run_pipeline(
    cfg: ToolkitConfig, run_dir: str | Path, stages: list[str] | None = None, force: bool = False, log: Callable = print
) -> dict[str, Path]:
    """Run the configured stages in pipeline order; return each stage's artefact folder."""
    wanted = stages if stages is not None else cfg.stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    if not wanted:
        raise StageError(f"no stages to run; name at least one of {', '.join(STAGES)}")
    check_inputs(cfg, wanted, run_dir)
    run = RunDir(run_dir)
    lock, refused = None, None
    if D.is_main():  # one writer per run directory; the other ranks learn rank 0's answer and its token
        try:
            if run.root.exists() and not run.root.is_dir():
                raise StageError(f"output_dir {run.root} is a file; pass a directory (--output-dir)")
            lock = RunLock(run, "medusa-train").acquire()
        except ToolkitError as e:
            refused = e
    if not D.all_true(refused is None):
        raise refused or RunLockError(f"{run.root} is in use by another command (rank 0 could not lock it)")
    token = D.broadcast_object(lock.token if lock else None)
    try:
        if D.is_main():
            remove_stale_temp(run, log)
            run.config.write_text(cfg.to_yaml())
        D.barrier()
        return {
            name: run_stage(cfg, name, run.root, force=force, log=log, token=token) for name in STAGES if name in wanted
        }
    finally:
        if lock is not None:
            lock.release()


def remove_stale_temp(run: RunDir, log: Callable = print) -> None:
    """Temp folders of stages whose writer is gone (the run lock is ours, so nobody else is writing them)."""
    for tmp in sorted(run.root.glob(".*.tmp*")):
        if tmp.is_dir() and tmp.name.split(".tmp")[0].lstrip(".") in STAGES:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"[run] removed {tmp.name}, left by a run that was killed")
