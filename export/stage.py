"""The `export` stage and the pieces medusa-export shares with it: gather a run's artefacts, gate pushes on
verification, write the packages, push them."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.export.hub import HubPushError, PushResult, push_folder
from medusa_toolkit.export.model_card import verification_verdict
from medusa_toolkit.export.package import ExportInputs, export_packages, repo_ids_for, resolve_formats
from medusa_toolkit.heads import HeadsLoadError, MedusaHeads
from medusa_toolkit.medusa_model import load_heads


class ExportError(ToolkitError, RuntimeError):
    """The export cannot go ahead (e.g. unverified heads for a push); the message says what to do."""


def read_json(path: str | Path | None) -> dict | None:
    """A JSON file's content, or None when the path is None or missing."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None


def check_push_allowed(verification: dict | None, allow_unverified: bool, source: str = "the run") -> None:
    """Refuse to publish heads whose verification failed or is missing, unless explicitly allowed."""
    verdict = verification_verdict(verification)
    if verdict is True or allow_unverified:
        return
    why = "failed verification" if verdict is False else "have no passing verification report"
    raise ExportError(
        f"refusing to push: the heads {why} ({source}). Run the verify stage (medusa-verify) first, or pass "
        "--allow-unverified (export.allow_unverified: true) to publish anyway"
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
        from medusa_toolkit.models import load_base_model

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

        from medusa_toolkit.models import resolve_model_path

        return None, AutoTokenizer.from_pretrained(resolve_model_path(base))
    except Exception as e:  # the tokenizer only spares TGI users a flag
        warnings.warn(f"could not load the tokenizer of {base} ({e}); the medusa package will have none", stacklevel=2)
        return None, None


def gather_inputs(
    heads: str | Path | MedusaHeads,
    run_dir: str | Path | None = None,
    *,
    base_model: str | None = None,
    tree: str | Path | None = None,
    verification: str | Path | None = None,
    lm_head_weight: torch.Tensor | None = None,
    tokenizer: object = None,
    include_tokenizer: bool = True,
    log: Callable = print,
) -> ExportInputs:
    """Heads plus the run's tree.json, verify report, training summary, resolved config and PNG plots (when present)."""
    heads_dir = Path(heads) if not isinstance(heads, MedusaHeads) and Path(heads).is_dir() else None
    if not isinstance(heads, MedusaHeads):
        try:
            heads = load_heads(heads)
        except HeadsLoadError as e:
            raise ExportError(str(e)) from None
    run = Path(run_dir) if run_dir is not None else None
    tree_path = Path(tree) if tree else (run / "tree" / "tree.json" if run else None)
    if tree and not Path(tree).is_file():
        raise ExportError(f"tree file not found: {tree}")
    report_path = Path(verification) if verification else (run / "verify" / "report.json" if run else None)
    if verification and not Path(verification).is_file():
        raise ExportError(f"verification report not found: {verification}")
    tree_data = read_json(tree_path)
    if isinstance(tree_data, list):  # a bare medusa_choices list
        tree_data = {"paths": tree_data, "top_k": max(max(p) for p in tree_data) + 1}
    plots = []
    for folder in [heads_dir, run / "tree" if run else None, run / "verify" if run else None]:
        if folder is not None and folder.is_dir():
            plots += sorted(folder.glob("*.png"))
    config_path = run / "config.resolved.yaml" if run else None
    base = base_model or heads.config.base_model_name_or_path
    if lm_head_weight is None and tokenizer is None:
        lm_head_weight, tokenizer = load_base_parts(base, heads.head_type == "shared_lm_head", include_tokenizer, log)
    return ExportInputs(
        heads=heads,
        base_model=base,
        lm_head_weight=lm_head_weight,
        tokenizer=tokenizer if include_tokenizer else None,
        tree=tree_data,
        verification=read_json(report_path),
        training_summary=read_json(heads_dir / "training_summary.json") if heads_dir else None,
        config_yaml=config_path.read_text() if config_path and config_path.is_file() else None,
        plots=plots,
    )


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


def run_export(cfg: ToolkitConfig, run_dir: Path, out_dir: Path) -> None:
    """The `export` stage: run_dir/heads (+ tree, verify report) -> out_dir/medusa, out_dir/vllm; push if configured."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one writer; the runner's barrier keeps the other ranks in step
    ex = cfg.export
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    formats = resolve_formats(ex.formats)
    if ex.push_to_hub:  # before any loading: an unverified push fails fast
        check_push_allowed(read_json(run_dir / "verify" / "report.json"), ex.allow_unverified, str(run_dir / "verify"))
    inputs = gather_inputs(
        run_dir / "heads", run_dir, base_model=cfg.model.name_or_path, include_tokenizer=ex.include_tokenizer
    )
    from medusa_toolkit.models import resolve_dtype

    dtype = resolve_dtype(ex.dtype) if ex.dtype else None
    folders = export_packages(inputs, out_dir, formats, dtype=dtype, repo_id=ex.push_to_hub)
    for fmt, folder in folders.items():
        print(f"[export] {fmt} package: {folder}")
    if ex.push_to_hub:
        try:
            push_packages(
                folders, ex.push_to_hub, private=ex.private, revision=ex.revision, create_pr=ex.create_pr,
                commit_message=ex.commit_message,
            )  # fmt: skip
        except HubPushError as e:
            raise ExportError(str(e)) from None
