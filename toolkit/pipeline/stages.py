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
from medusa_toolkit.run_dir import RunDir
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

    @classmethod
    def prepare(cls, cfg: ToolkitConfig, run_dir: str | Path, stage: str, out: str | Path | None = None) -> StageRun:
        """The StageRun the runner would pass (tests and benchmarks call a stage function directly with it)."""
        dirs = RunDir(run_dir)
        inputs = stage_inputs(cfg, STAGES[stage], dirs)
        return cls(cfg, dirs, Path(out) if out is not None else dirs.artefact(stage), digest_of(inputs), inputs)


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
        "tree": {"tree.tree": cfg.tree.tree if cfg.tree.tree != "auto" else None, "tree.prompts": cfg.tree.prompts},
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


def run_stage(cfg: ToolkitConfig, name: str, run_dir: str | Path, force: bool = False, log: Callable = print) -> Path:
    """Run one stage (or reuse its artefact); return its artefact folder (`run_dir/name`; `run_dir/heads` for train)."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    stage = STAGES[name]
    run = RunDir(run_dir)
    final = run.artefact(name)
    cached, why = cache_status(cfg, stage, run.root)
    if cached and not force:
        if D.is_main():
            log(f"[{name}] cached: {final}")
        return final
    for dep in stage.requires:
        if read_manifest(run.artefact(dep)) is None:
            raise StageError(f"stage '{name}' needs the '{dep}' artefact in {run.root}; run stage '{dep}' first")
    if D.is_main() and final.exists() and not force and why:
        log(f"[{name}] rerunning: {why}")
    # Same name on every rank (no mkdtemp): ranks may all write their share into it.
    tmp = run.root / f".{name}.tmp"
    stage_run = StageRun.prepare(cfg, run.root, name, tmp)
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


def check_inputs(cfg: ToolkitConfig, stages: list[str]) -> None:
    """Before the first stage runs: every file the config names for these stages exists and parses.

    Minutes of generation must not be spent before a typo in a DeepSpeed path is found.
    """
    from medusa_toolkit.model.base_model import check_model_spec
    from medusa_toolkit.model.tree import check_tree_spec
    from medusa_toolkit.prompts import check_prompt_source

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
            if not isinstance(json.loads(path.read_text()), dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(f"train.deepspeed.config_file {path}: not a DeepSpeed JSON object ({e})") from None
    if "train" in stages and cfg.heads.init_from:
        spec = cfg.heads.init_from
        if is_file_spec(spec) and not Path(spec).expanduser().exists() and spec.count("/") != 1:
            raise ConfigError(f"heads.init_from not found: {spec}; pass a heads folder or a Hub id ORG/NAME")
    if "tree" in stages:
        check_tree_spec(cfg.tree.tree, "tree.tree", allow_auto=True)
        if cfg.tree.tree == "auto" and is_file_spec(cfg.tree.prompts):  # named sets matter only without data rows
            check_prompt_source(cfg.tree.prompts, None, "tree")
    if "verify" in stages:
        if cfg.verify.tree:
            check_tree_spec(cfg.verify.tree, "verify.tree")
        check_prompt_source(cfg.verify.prompts, None, "verify")
    if "export" in stages and cfg.export.push_to_hub:
        from medusa_toolkit.model.base_model import base_hub_id

        if not base_hub_id(cfg.export.base_model_id or cfg.model.name_or_path):
            raise ConfigError(
                f"export.push_to_hub needs a Hub id for the base model, but model.name_or_path is "
                f"{cfg.model.name_or_path!r}: set export.base_model_id: ORG/NAME (engines load the base by it)"
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
    check_inputs(cfg, wanted)
    run = RunDir(run_dir)
    if D.is_main():
        run.root.mkdir(parents=True, exist_ok=True)
        run.config.write_text(cfg.to_yaml())
    D.barrier()
    return {name: run_stage(cfg, name, run.root, force=force, log=log) for name in STAGES if name in wanted}
