"""The `export` stage and what medusa-export shares with it: gather a run's artefacts, gate pushes on a verification
report that names exactly these heads, write the packages, push them."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_toolkit import distributed as D
from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.export.model_card import report_mismatch, verification_verdict
from medusa_toolkit.export.package import ExportError, ExportInputs, export_packages, repo_ids_for, resolve_formats
from medusa_toolkit.hub import PushResult, push_folder
from medusa_toolkit.model.base_model import base_hub_id
from medusa_toolkit.model.heads import HeadsLoadError, MedusaHeads
from medusa_toolkit.model.tree import MedusaTree, TreeError, tree_digest
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.run_dir import RunDir


def read_json(
    path: str | Path | None, what: str = "JSON", kinds: tuple[type, ...] = (dict, list)
) -> dict | list | None:
    """A JSON file's content (a `what`: one of `kinds`), or None when the path is None or missing."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, kinds):
        raise ExportError(f"{path} is not a {what} (got a JSON {type(data).__name__})")
    return data


def run_file(path: Path | None, root: Path, skipped: list[str]) -> Path | None:
    """`path` when it is a regular file inside `root` (a run or heads folder), else None, noted in `skipped`: a link
    there may point anywhere (a key, a private file), and what a package holds is published as it is."""
    if path is None or not (path.is_file() or path.is_symlink()):
        return None
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        skipped.append(f"{path} (a link)")
        return None
    return path


def check_push_allowed(inputs: ExportInputs, allow_unverified: bool, source: str = "the run") -> None:
    """Refuse to publish heads unless a passing verify report names exactly these heads (and the shipped tree)."""
    verdict = verification_verdict(inputs.verification)
    mismatch = report_mismatch(inputs.verification, inputs.heads_sha256, inputs.tree_sha256)
    if verdict is True and mismatch is None:
        return
    if allow_unverified:
        warnings.warn(f"pushing heads without a passing verification report for them ({source})", stacklevel=2)
        return
    if verdict is True:
        why = f"the passing report ({source}) is not about these heads: {mismatch}"
    elif verdict is False:
        why = f"the heads failed verification ({source})"
    else:
        why = f"the heads have no passing verification report ({source})"
    raise ExportError(
        f"refusing to push: {why}. Run the verify stage (medusa-verify --heads <these heads> --report ...) and pass "
        "its report, or pass --allow-unverified (export.allow_unverified: true) to publish anyway"
    )


def load_base_parts(
    base: str | None, need_lm_head: bool, want_tokenizer: bool, log: Callable = print
) -> tuple[torch.Tensor | None, object]:
    """The base lm_head weight (shared heads need it) and tokenizer (for TGI), loading only what is needed."""
    if base is None:
        if need_lm_head:
            raise ExportError(
                "these heads share the base lm_head, so the export needs the base model: pass --base-model "
                "(the heads' config names none)"
            )
        return None, None
    if need_lm_head:
        from medusa_toolkit.model.base_model import load_base_model

        log(f"[export] loading {base} for its lm_head (the heads share it)")
        model, tokenizer = load_base_model(base, dtype="float32", device="cpu")
        lm_head = model.get_output_embeddings()
        if getattr(lm_head, "bias", None) is not None:
            warnings.warn(
                "the base lm_head has a bias, which the Medusa layouts cannot hold; it is left out", stacklevel=2
            )
        return lm_head.weight.detach(), tokenizer if want_tokenizer else None
    if not want_tokenizer:
        return None, None
    try:
        from transformers import AutoTokenizer

        from medusa_toolkit.model.base_model import resolve_model_path

        return None, AutoTokenizer.from_pretrained(resolve_model_path(base))
    except Exception as e:  # the tokenizer only spares TGI users a flag
        warnings.warn(f"could not load the tokenizer of {base} ({e}); the medusa package will have none", stacklevel=2)
        return None, None


def _tree_record(tree: str | Path | None) -> tuple[dict | None, MedusaTree | None]:
    """(tree.json content, the tree) of a tree file; a bare medusa_choices list is accepted."""
    data = read_json(tree, "tree (medusa_choices paths, or a tree.json mapping)")
    if data is None:
        return None, None
    try:
        parsed = (
            MedusaTree.from_paths(data)
            if isinstance(data, list)
            else MedusaTree.from_paths(data.get("paths"), top_k=data.get("top_k"))
        )
    except TreeError as e:
        raise ExportError(f"{tree}: {e}") from None
    if not parsed.paths:  # the tuner's own fallback when no tree paid: valid, and worth saying
        warnings.warn(f"{tree}: the tree has no paths: engines that read it decode without speculation", stacklevel=2)
    if isinstance(data, list):
        data = {"paths": [list(p) for p in parsed.paths], "top_k": parsed.top_k}
    return data, parsed


def check_fits(heads: MedusaHeads, base: str | None, tree: MedusaTree | None, log: Callable = print) -> None:
    """What a package holds must load and decode: heads without nan/inf, heads that fit the base's hidden size and
    vocabulary, a tree no deeper than the heads and with ranks inside their vocabulary. Checked before anything is
    written or pushed; the base is read from its config.json only."""
    bad = heads.nonfinite()
    if bad:
        raise ExportError(f"the heads hold nan or inf ({', '.join(bad[:3])}): they come from a training run that "
                          "diverged; retrain them (lower train.learning_rate); nothing was written")  # fmt: skip
    if tree is not None:
        if tree.depth > heads.num_heads:
            raise ExportError(f"the tree is {tree.depth} deep but these heads number {heads.num_heads}: pass a tree "
                              f"of depth <= {heads.num_heads} (--tree)")  # fmt: skip
        if tree.top_k > heads.head_vocab_size:
            raise ExportError(f"the tree draws the top-{tree.top_k} candidates of heads that score "
                              f"{heads.head_vocab_size} tokens: pass a tree with smaller ranks (--tree)")  # fmt: skip
    config = base_config(base) if base else None
    if config is None:
        log(f"[export] could not read the config of the base {base!r}: the heads were not checked against it")
        return
    hidden, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
    c = heads.config
    if (hidden, vocab) != (c.hidden_size, c.vocab_size):
        raise ExportError(
            f"these heads do not fit the base {base}: heads hidden {c.hidden_size}, vocab {c.vocab_size}; base hidden "
            f"{hidden}, vocab {vocab}. Pass the base they were trained on (--base-model) or other heads"
        )


def base_config(base: str):
    """The base's transformers config (config.json only, offline), or None when it cannot be read here."""
    try:
        from transformers import AutoConfig

        from medusa_toolkit.model.base_model import resolve_model_path

        # local_files_only: a check must not wait on the network (a Hub base that is not cached is not checkable).
        return AutoConfig.from_pretrained(resolve_model_path(base), local_files_only=True)
    except Exception:  # a Hub base that is not cached, a folder without config: not checkable here
        return None


@dataclass
class ExportRequest:
    """Where everything comes from. Paths default to the run dir's artefacts."""

    heads: str | Path | MedusaHeads
    run_dir: RunDir | None = None
    base_model: str | None = None  # name_or_path to load the base from (lm_head, tokenizer)
    base_model_id: str | None = None  # the Hub id written into the packages
    tree: str | Path | None = None
    verification: str | Path | None = None
    include_tokenizer: bool = True


def gather_inputs(req: ExportRequest, *, push: bool = False, allow_unverified: bool = False, log: Callable = print):
    """Heads plus the run's tree.json, verify report, training summary, resolved config and PNG plots (when present).

    Cheap things first: the heads, the tree and the report are read and (for a push) the gate is checked before the
    base model is loaded for its lm_head or tokenizer.
    """
    heads = req.heads
    heads_dir = Path(heads) if not isinstance(heads, MedusaHeads) and Path(heads).is_dir() else None
    if not isinstance(heads, MedusaHeads):
        heads = MedusaHeads.from_pretrained(heads)
    run = RunDir(req.run_dir) if req.run_dir else None
    if req.tree and not Path(req.tree).is_file():
        raise ExportError(f"tree file not found: {req.tree}")
    if req.verification and not Path(req.verification).is_file():
        raise ExportError(f"verification report not found: {req.verification}")
    # Files the user named are read as named; what is picked up from the run and heads folders must live there.
    skipped: list[str] = []
    tree_path = Path(req.tree) if req.tree else (run_file(run.tree_file, run.root, skipped) if run else None)
    report_path = (
        Path(req.verification) if req.verification else (run_file(run.report, run.root, skipped) if run else None)
    )
    tree_data, tree = _tree_record(tree_path)
    base = req.base_model or heads.config.base_model_name_or_path
    check_fits(heads, base, tree, log)
    hub_id = base_hub_id(req.base_model_id) or base_hub_id(base)
    if req.base_model_id and not base_hub_id(req.base_model_id):
        raise ExportError(f"--base-model-id {req.base_model_id!r} is not a Hub id; use ORG/NAME")
    inputs = ExportInputs(
        heads=heads, base_model=base, base_model_hub_id=hub_id, tree=tree_data,
        tree_sha256=tree_digest(tree) if tree is not None else None, heads_sha256=heads.content_digest(),
        verification=read_json(report_path, "verify report (a JSON object)", (dict,)),
    )  # fmt: skip
    if push:
        if hub_id is None:
            raise ExportError(
                f"a pushed package must name its base by a Hub id, and {base!r} is none (a local path or unknown): "
                "pass --base-model-id ORG/NAME (export.base_model_id)"
            )
        check_push_allowed(inputs, allow_unverified, str(report_path) if report_path else "no report given")
    elif hub_id is None:
        warnings.warn(
            f"the packages name the base as {base!r}, which is not a Hub id: engines on other machines cannot load it; "
            "pass --base-model-id ORG/NAME (a push requires it)",
            stacklevel=2,
        )
    plots = []
    for folder, root in [(heads_dir, heads_dir), *([(run.tree, run.root), (run.verify, run.root)] if run else [])]:
        if folder is not None and folder.is_dir():
            plots += [p for p in sorted(folder.glob("*.png")) if run_file(p, root, skipped)]
    config_path = run_file(run.config, run.root, skipped) if run else None
    summary_path = run_file(heads_dir / "training_summary.json", heads_dir, skipped) if heads_dir else None
    if skipped:
        log(f"[export] left out of the packages, links may point anywhere: {', '.join(skipped)}")
    inputs.lm_head_weight, tokenizer = load_base_parts(
        base, heads.head_type == "shared_lm_head", req.include_tokenizer, log
    )
    inputs.tokenizer = tokenizer if req.include_tokenizer else None
    inputs.training_summary = read_json(summary_path, "training summary (a JSON object)", (dict,))
    inputs.config_yaml = config_path.read_text() if config_path else None
    inputs.plots = plots
    return inputs


def push_packages(
    folders: dict[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    log: Callable = print,
) -> list[PushResult]:
    """Push each package to its repo (medusa -> repo_id, vllm -> repo_id-vllm), one commit per repo."""
    repos = repo_ids_for(repo_id, list(folders))
    return [
        push_folder(
            folder, repos[fmt], private=private, revision=revision, create_pr=create_pr,
            commit_message=commit_message, retries=retries, backoff=backoff, log=log,
        )
        for fmt, folder in folders.items()
    ]  # fmt: skip


@dataclass
class Exported:
    """What an export wrote (a folder per format) and, when it pushed, each push."""

    folders: dict[str, Path]
    pushes: list[PushResult]


def export(
    cfg: ToolkitConfig, req: ExportRequest, out_dir: Path, log: Callable = print, final_dir: Path | None = None
) -> Exported:
    """Write the configured packages into out_dir (and push them when export.push_to_hub is set). `final_dir`: where
    out_dir ends up (the stage writes into the runner's temp folder), for the log."""
    from medusa_toolkit.model.base_model import resolve_dtype

    ex = cfg.export
    formats = resolve_formats(ex.formats)
    try:
        inputs = gather_inputs(req, push=bool(ex.push_to_hub), allow_unverified=ex.allow_unverified, log=log)
    except HeadsLoadError as e:
        raise ExportError(str(e)) from None
    dtype = resolve_dtype(ex.dtype) if ex.dtype else None
    folders = export_packages(inputs, out_dir, formats, dtype=dtype, repo_id=ex.push_to_hub)
    for fmt, folder in folders.items():
        log(f"[export] {fmt} package: {Path(final_dir or out_dir) / folder.name}")
    pushes = []
    if ex.push_to_hub:
        pushes = push_packages(
            folders, ex.push_to_hub, private=ex.private, revision=ex.revision, create_pr=ex.create_pr,
            commit_message=ex.commit_message, log=log,
        )  # fmt: skip
        for r in pushes:
            log(f"[export] {r.repo_id}: {r.pr_url or r.commit_url}")
    return Exported(folders, pushes)


def run_export(run: StageRun) -> None:
    """The `export` stage: the run's heads (+ tree, verify report) -> OUT/medusa, OUT/vllm; push if configured."""
    if not D.is_main():
        return  # one writer; the runner's barrier keeps the other ranks in step
    cfg = run.cfg
    req = ExportRequest(
        run.dirs.heads, run.dirs, base_model=cfg.model.name_or_path, base_model_id=cfg.export.base_model_id,
        include_tokenizer=cfg.export.include_tokenizer,
    )  # fmt: skip
    export(cfg, req, run.out, final_dir=run.dirs.export)


def push_heads(
    heads: MedusaHeads,
    repo_id: str,
    *,
    verification: str | Path | None = None,
    tree: str | Path | None = None,
    base_model_id: str | None = None,
    allow_unverified: bool = False,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    log: Callable = print,
) -> list[PushResult]:
    """`MedusaHeads.push_to_hub`: the medusa package of these heads, built and gated exactly as medusa-export builds and
    gates it (model card, verification.json or "Not verified"), pushed to `repo_id`."""
    import tempfile

    from medusa_toolkit.config import config_from_dict

    cfg = config_from_dict({"export": {
        "formats": ["medusa"], "push_to_hub": repo_id, "base_model_id": base_model_id, "private": private,
        "revision": revision, "create_pr": create_pr, "commit_message": commit_message,
        "allow_unverified": allow_unverified, "include_tokenizer": False,
    }})  # fmt: skip
    req = ExportRequest(heads, tree=tree, verification=verification, base_model_id=base_model_id,
                        include_tokenizer=False)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medusa-push-") as tmp:
        return export(cfg, req, Path(tmp), log=log).pushes
