"""Build the exported packages (medusa and/or vllm) from heads plus whatever the run produced, atomically.

Everything is written into a temp folder beside the target and renamed into place at the end, so a failure never
leaves a half package behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medusa_toolkit.digest import folder_files
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.export.formats import write_medusa, write_vllm
from medusa_toolkit.export.model_card import CardInfo, build_model_card
from medusa_toolkit.model.base_model import BUILTIN_HUB_IDS, base_hub_id
from medusa_toolkit.model.heads import MedusaHeads

FORMATS = ("medusa", "vllm")


class ExportError(ToolkitError, RuntimeError):
    """The export cannot go ahead (e.g. unverified heads for a push); the message says what to do."""


# Beside the packages in OUT: which files medusa-export wrote there (and their hashes). A package folder is replaced
# only when it holds exactly those bytes: nothing the user wrote or edited in OUT/medusa or OUT/vllm is ever deleted.
OWNED = ".medusa-export.json"


@dataclass
class ExportInputs:
    """What goes into a package. Only `heads` is required; `lm_head_weight` is needed for shared_lm_head heads."""

    heads: MedusaHeads
    base_model: str | None = None
    lm_head_weight: torch.Tensor | None = None
    tokenizer: Any = None  # saved into the medusa package (TGI reads the tokenizer from --model-id)
    tree: dict | None = None
    verification: dict | None = None  # the verify report (summarised into verification.json)
    training_summary: dict | None = None
    config_yaml: str | None = None  # the exact config used (config.resolved.yaml)
    plots: list[Path] = field(default_factory=list)
    license: str | None = None
    base_model_hub_id: str | None = None
    heads_sha256: str | None = None  # MedusaHeads.content_digest() of `heads`; a report must name it to count
    tree_sha256: str | None = None  # tree_digest of `tree`


def resolve_formats(fmt: str | Sequence[str]) -> list[str]:
    """'all' | 'medusa' | 'vllm' | a list of them -> the formats to write, in a fixed order."""
    wanted = [fmt] if isinstance(fmt, str) else list(fmt)
    if "all" in wanted:
        wanted = list(FORMATS)
    bad = [f for f in wanted if f not in FORMATS]
    if bad or not wanted:
        raise ValueError(f"unknown export format(s) {bad or wanted}; use medusa, vllm or all")
    return [f for f in FORMATS if f in wanted]


def repo_ids_for(repo_id: str | None, formats: Sequence[str]) -> dict[str, str | None]:
    """One Hub repo per package: the medusa package at repo_id, the vllm one at repo_id-vllm (or repo_id alone)."""
    if repo_id is None:
        return {f: None for f in formats}
    if list(formats) == ["vllm"]:
        return {"vllm": repo_id}
    return {f: repo_id if f == "medusa" else f"{repo_id}-vllm" for f in formats}


def base_license(hub_id: str | None, local: str | None = None, online: bool = False) -> str | None:
    """The base model's license for the card's metadata: builtin aliases, a local/cached README, or (online) the Hub's.

    A nicety: any failure gives None, never a failed export."""
    for alias, (known_id, license_) in BUILTIN_HUB_IDS.items():
        if hub_id == known_id or local == alias:
            return license_
    from huggingface_hub import ModelCard, constants, try_to_load_from_cache

    readme = Path(local).expanduser() / "README.md" if local and Path(local).expanduser().is_dir() else None
    if readme is None and hub_id is not None:
        cached = try_to_load_from_cache(hub_id, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    try:
        if readme is not None and readme.is_file():
            return ModelCard.load(readme).data.license
        if online and hub_id is not None and not constants.HF_HUB_OFFLINE:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(hub_id, "README.md", endpoint=os.environ.get("HF_ENDPOINT"), etag_timeout=5)
            return ModelCard.load(path).data.license
    except Exception:
        pass
    return None


def summarize_report(report: dict | None) -> dict | None:
    """The verify report without its bulky per-prompt records (verdict, settings, summary, notes stay)."""
    if report is None:
        return None
    out = {k: v for k, v in report.items() if k != "prompts"}
    if isinstance(report.get("prompts"), list):
        out["num_prompt_records"] = len(report["prompts"])
    return out


def _plot_acceptance(acc: list, path: Path) -> bool:
    """A heads x rank heatmap (or a per-head bar chart) of measured acceptance; False when `acc` has no shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        matrix = torch.tensor(acc, dtype=torch.float32)
    except (TypeError, ValueError):
        return False
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.numel() == 0:
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * matrix.shape[1], 1.2 + 0.5 * matrix.shape[0]))
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xlabel("candidate rank")
    ax.set_ylabel("head (predicts t+k+2)")
    ax.set_xticks(range(matrix.shape[1]), [str(r + 1) for r in range(matrix.shape[1])])
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_title("Measured acceptance")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _extras(inputs: ExportInputs, folder: Path, fmt: str) -> list[str]:
    """tree.json, verification.json, training_summary.json, config, plots (+ tokenizer for medusa). Returns plot paths."""
    if inputs.tree is not None:
        _write_json(folder / "tree.json", inputs.tree)
    if inputs.verification is not None:
        _write_json(folder / "verification.json", summarize_report(inputs.verification))
    if inputs.training_summary is not None:
        _write_json(folder / "training_summary.json", inputs.training_summary)
    if inputs.config_yaml is not None:
        (folder / "config.resolved.yaml").write_text(inputs.config_yaml)
    plots = []
    if inputs.plots:
        (folder / "plots").mkdir(exist_ok=True)
        for p in inputs.plots:
            shutil.copy2(p, folder / "plots" / p.name)
            plots.append(f"plots/{p.name}")
    if not any("accept" in p for p in plots):  # tuning normally ships acceptance_heatmap.png; else draw one
        from medusa_toolkit.export.model_card import acceptance_matrix

        found = acceptance_matrix((inputs.tree, inputs.verification, inputs.training_summary))
        if found is not None:
            (folder / "plots").mkdir(exist_ok=True)
            if _plot_acceptance(found[1], folder / "plots" / "acceptance_heatmap.png"):
                plots.append("plots/acceptance_heatmap.png")
    if fmt == "medusa" and inputs.tokenizer is not None:
        try:
            inputs.tokenizer.save_pretrained(folder)
        except Exception as e:  # a tokenizer that cannot be saved costs TGI convenience only
            warnings.warn(
                f"could not save the base tokenizer into the package ({e}); TGI will need --tokenizer-config-path",
                stacklevel=2,
            )
    return plots


def export_packages(
    inputs: ExportInputs,
    out_dir: str | Path,
    formats: str | Sequence[str] = "medusa",
    dtype: torch.dtype | None = None,
    repo_id: str | None = None,
) -> dict[str, Path]:
    """Write `out_dir/<format>/` for each format (atomically: temp folder beside, then rename); return the folders."""
    formats = resolve_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repos = repo_ids_for(repo_id, formats)
    if inputs.base_model is None:
        inputs.base_model = inputs.heads.config.base_model_name_or_path
    if inputs.base_model_hub_id is None:
        inputs.base_model_hub_id = base_hub_id(inputs.base_model)
    if inputs.license is None:
        inputs.license = base_license(inputs.base_model_hub_id, inputs.base_model, online=repo_id is not None)
    if inputs.heads_sha256 is None:
        inputs.heads_sha256 = inputs.heads.content_digest()
    # TGI loads base_model_name_or_path itself: give engines the Hub id when an alias maps to one.
    engine_base = inputs.base_model_hub_id or inputs.base_model
    check_replaceable(out_dir, formats)  # before any work: never overwrite what we did not write
    tmp = Path(tempfile.mkdtemp(prefix=".export.tmp-", dir=out_dir))
    try:
        for fmt in formats:
            folder = tmp / fmt
            if fmt == "medusa":
                write_medusa(inputs.heads, folder, inputs.lm_head_weight, engine_base, inputs.tree, dtype)
            else:
                write_vllm(inputs.heads, folder, inputs.lm_head_weight, engine_base, dtype)
            plots = _extras(inputs, folder, fmt)
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) + ["README.md"]
            info = CardInfo(
                fmt=fmt,
                heads_config={
                    "medusa_num_heads": inputs.heads.num_heads,
                    "medusa_num_layers": inputs.heads.num_layers,
                    "hidden_size": inputs.heads.config.hidden_size,
                    "vocab_size": inputs.heads.config.vocab_size,
                    "head_type": inputs.heads.head_type,
                },
                base_model=inputs.base_model,
                base_model_hub_id=inputs.base_model_hub_id,
                license=inputs.license,
                repo_id=repos[fmt],
                medusa_repo_id=repos.get("medusa"),
                vllm_repo_id=repos.get("vllm"),
                tree=inputs.tree,
                verification=summarize_report(inputs.verification),
                heads_sha256=inputs.heads_sha256,
                tree_sha256=inputs.tree_sha256,
                training_summary=inputs.training_summary,
                plots=plots,
                files=files,
                dtype=str(dtype).removeprefix("torch.") if dtype else None,
            )
            build_model_card(info).save(folder / "README.md")
            for path in folder.rglob("*"):  # mkdtemp/safetensors leave owner-only modes; packages are for sharing
                path.chmod(0o755 if path.is_dir() else 0o644)
        done, owned = {}, _read_owned(out_dir)
        for fmt in formats:
            final = out_dir / fmt
            files = folder_files(tmp / fmt)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / fmt, final)
            owned[fmt] = files
            done[fmt] = final
        (out_dir / OWNED).write_text(json.dumps(owned, indent=2) + "\n")
        return done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_owned(out_dir: Path) -> dict[str, dict[str, str]]:
    try:
        owned = json.loads((out_dir / OWNED).read_text())
    except (OSError, ValueError):
        return {}
    return owned if isinstance(owned, dict) else {}


def check_replaceable(out_dir: Path, formats: Sequence[str]) -> None:
    """Refuse to replace a package folder that holds files medusa-export did not write there (or that were edited)."""
    owned = _read_owned(out_dir)
    for fmt in formats:
        final = out_dir / fmt
        if not final.exists():
            continue
        present = folder_files(final) if final.is_dir() else {"": "not a folder"}
        ours = owned.get(fmt) or {}
        foreign = sorted(rel for rel, digest in present.items() if ours.get(rel) != digest)
        if foreign or not final.is_dir():
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ExportError(
                f"{final} already exists and holds files medusa-export did not write there ({shown or final.name}); "
                "nothing was changed. Export to another --out, or move those files away"
            )
