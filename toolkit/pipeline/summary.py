"""The end-of-run summary `medusa-train` prints: what each finished stage produced, read back from its artefact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medusa_toolkit.run_dir import RunDir


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def pipeline_summary(run_dir: str | Path) -> str:
    """A few lines per stage artefact present in `run_dir` (heads, tree, verification, speed, export)."""
    run = RunDir(run_dir)
    lines = [f"== medusa-train summary: {run.root} =="]
    train = _read(run.heads / "training_summary.json")
    if train:
        top1 = (train.get("final_heldout") or {}).get("top1") or []
        heads = ", ".join(f"head {k}: {a:.2f}" for k, a in enumerate(top1)) or "n/a"
        lines.append(
            f"heads    {train.get('num_heads')} x {train.get('head_type')}, {train.get('steps')} steps; held-out top-1 {heads}"
        )
    tree = _read(run.tree_file)
    if tree:
        lines.append(
            f"tree     {tree.get('num_nodes', len(tree.get('paths', [])) + 1)} nodes ({tree.get('objective', 'preset')}), "
            f"predicted accepted length {_num(tree.get('predicted_accept_length'))} tokens/step"
        )
        results = (tree.get("validation") or {}).get("results") or {}
        tuned, base = results.get("tuned"), results.get("base_greedy")
        if tuned and base:  # the one speed measurement of a run: the tree stage's, against one named baseline
            step = "compiled" if (tree.get("latency") or {}).get("compiled_step") else "eager"
            lines.append(
                f"speed    held-out: Medusa {_num(tuned.get('tokens_per_second'), '.1f')} tokens/s vs base greedy "
                f"{_num(base.get('tokens_per_second'), '.1f')} tokens/s = {_num(tuned.get('speedup_vs_base'))}x "
                f"(both through the same {step} step), measured accepted length {_num(tuned.get('mean_accept_length'))}"
            )
        for domain, per in ((tree.get("validation") or {}).get("by_domain") or {}).items():
            t = per.get("tuned") or {}
            lines.append(
                f"  {domain:<12} accepted length {_num(t.get('mean_accept_length'))}, "
                f"{_num(t.get('speedup_vs_base'))}x base greedy"
            )
        if tree.get("fallback"):
            lines.append(f"tree     {tree['fallback']}")
    report = _read(run.report)
    if report:
        s, verdict, settings = report.get("summary", {}), report.get("verdict", {}), report.get("settings", {})
        step = "compiled" if settings.get("compiled_step") else "eager"
        lines.append(
            f"verify   {str(verdict.get('status', '?')).upper()}: {s.get('prompts')} prompts, {s.get('mismatches')} mismatches, "
            f"{s.get('ties')} ties against {settings.get('reference', 'the base')} ({step} step); accepted length "
            f"{_num(s.get('mean_accept_length'))}"
        )
    export = run.export
    for fmt in ("medusa", "vllm"):
        if (export / fmt).is_dir():
            card = export / fmt / "README.md"
            lines.append(f"export   {fmt}: {export / fmt}" + (" (model card README.md)" if card.is_file() else ""))
    return "\n".join(lines)
