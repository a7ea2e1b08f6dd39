"""Tree tuning: choose the Medusa tree from measured joint acceptance and measured step latency, then check the choice
by decoding held-out prompts.

1. Calibrate (medusa_toolkit.tuning.calibration): the empirical joint acceptance probability of every path of head ranks.
2. Search (medusa_toolkit.tuning.search): the optimal tree for every node budget.
3. Time (medusa_toolkit.tuning.timing): one real decoding step per budget on this device; for the speed objective the
   budget with the best predicted tokens/s wins.
4. Validate (medusa_toolkit.tuning.evaluate): decode held-out prompts with the chosen tree, the `mc_sim_7b_63` and
   `chain-N` presets and plain greedy, and report predicted vs measured accepted length and tokens/s.
The stage and medusa-tune-tree gather the inputs (tuning.inputs) and call `tune_tree` (tuning.stage, tuning.cli).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medusa_toolkit.config import TreeConfig
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning import TuneError
from medusa_toolkit.tuning.calibration import Calibration
from medusa_toolkit.tuning.evaluate import comparison_trees, format_validation, validate
from medusa_toolkit.tuning.search import TuneResult, choose, greedy_order, tree_for_budget
from medusa_toolkit.tuning.timing import LATENCY_GRID, LatencyProfile, device_name, latency_grid, measure_step_times

MAX_STORED_NODES = 256  # joint acceptance table entries kept in tree.json (the most likely paths)


def choose_tree(
    model: MedusaModel,
    calib: Calibration,
    max_nodes: int = 64,
    objective: str = "speed",
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    repeats: int = 5,
    progress: bool = True,
    grid: tuple[int, ...] = LATENCY_GRID,
    profile: LatencyProfile | None = None,
) -> TuneResult:
    """The optimal tree for the objective: max expected accepted length (acceptance) or predicted tokens/s (speed),
    from step times measured here, or from `profile` (a machine measured elsewhere)."""
    if objective not in ("speed", "acceptance"):
        raise TuneError(f"objective {objective!r} is unknown; use 'speed' or 'acceptance'")
    if max_nodes < 1:
        raise TuneError(f"max nodes must be >= 1 (the root), got {max_nodes}")
    if objective == "acceptance":
        return choose(calib, max_nodes)
    if profile is not None:
        return choose(calib, max_nodes, profile.latency())
    order = greedy_order(calib)
    top = min(max_nodes, len(order) + 1)
    trees = {n: tree_for_budget(order, n) for n in latency_grid(top, grid)}
    times = measure_step_times(model, trees, prefix_length, batch_size, attn, repeats, progress=progress)
    result = choose(calib, max_nodes, times.median)
    result.latency_spread = times.spread
    return result


# ----------------------------------------------------------------------------------------------------------------------
# One call for the CLI and the stage


def tune_tree(
    model: MedusaModel,
    calib: Calibration,
    tc: TreeConfig,
    out_file: str | Path,
    *,
    attn: str | None = None,
    validation_prompts: list[list[int]] | None = None,
    validation_domains: list[str] | None = None,
    calibration_source: str = "",
    progress: bool = True,
    log=print,
    profile: LatencyProfile | None = None,
    profile_source: str | None = None,
) -> dict[str, Any]:
    """Choose the tree (tc.objective, tc.max_nodes; timed at tc.batch_size x tc.prefix_length), validate it on
    `validation_prompts` (tc.calibration_max_new_tokens each), write tree.json to `out_file` and the PNG plots beside
    it; return what tree.json holds."""
    from medusa_toolkit.tuning import plots

    out_file = Path(out_file)
    out_dir = out_file.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    objective, prefix_length, batch_size, max_new_tokens = (
        tc.objective,
        tc.prefix_length,
        tc.batch_size,
        tc.calibration_max_new_tokens,
    )
    result = choose_tree(
        model, calib, tc.max_nodes, objective, prefix_length, batch_size, attn, tc.latency_repeats, progress,
        profile=profile,
    )  # fmt: skip
    tree = result.tree
    order = greedy_order(calib)
    record: dict[str, Any] = {
        "name": tree.name,
        "paths": [list(p) for p in tree.paths],
        "top_k": tree.top_k,
        "objective": objective,
        "num_nodes": tree.num_nodes,
        "predicted_accept_length": result.predicted_accept_length,
        "predicted_tokens_per_second": result.predicted_tokens_per_second,
        "device": {
            "name": device_name(model.device),
            "type": model.device.type,
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": attn or model.base.config._attn_implementation,
            "batch_size": batch_size,
            "prefix_length": prefix_length,
        },
        "latency": {
            # Which curve chose the tree: this machine's, or a profile measured on the machine that will serve it.
            "source": f"profile {profile_source} ({profile.machine.get('device')})" if profile else "measured here",
            "compiled_step": bool(model.compiled),
            "measured": {
                "nodes": list(result.measured_latency),
                "step_time_s": list(result.measured_latency.values()),
                "spread": [result.latency_spread.get(n) for n in result.measured_latency],
            },
            "nodes": result.budgets,
            "step_time_s": result.step_time,
        },
        "curve": {
            "nodes": result.budgets,
            "expected_accept_length": result.accept_length,
            "predicted_tokens_per_second": result.tokens_per_second,
        },
        "acceptance": {
            "head_rank_accuracy": calib.head_accuracy(),
            "joint": [
                {"path": list(p), "count": calib.path_counts[p], "p": calib.probability(p)}
                for p in order[:MAX_STORED_NODES]
            ],
            "num_nonzero_paths": len(order),
        },
        "calibration": {
            "source": calibration_source,
            "num_sequences": calib.num_sequences,
            "num_positions": calib.num_positions,
            "dropped_positions": calib.dropped_positions,
            "depth": calib.depth,
            "top_k": calib.top_k,
        },
    }
    probs = {p: calib.probability(p) for p in tree.paths}
    plots.plot_acceptance_heatmap(calib.head_accuracy(), out_dir / "acceptance_heatmap.png")
    plots.plot_tree(tree.paths, probs, out_dir / "tree.png")
    measured_points = None
    if validation_prompts:
        trees, notes = comparison_trees(tree, model.num_heads)
        val = validate(model, trees, validation_prompts, max_new_tokens, attn, progress, validation_domains)
        by_domain = val.pop("by_domain", None)
        tuned = val["tuned"]
        if tuned["speedup_vs_base"] is not None and tuned["speedup_vs_base"] < 1.0 and tree.num_nodes > 1:
            # Never ship a tree that makes decoding slower than not using Medusa on the tuner's own validation.
            fallback = (
                f"no tree paid on validation: the tuned {tree.num_nodes}-node tree ran at "
                f"{tuned['speedup_vs_base']:.2f}x base greedy, so the 1-node tree (no speculation) was chosen"
            )
            notes.append(fallback)
            log(f"tree: {fallback}")
            tree = MedusaTree.from_paths([], name="root-only (no tree paid)")
            # What tree.json predicts is now the 1-node tree's: one token per step, at its own timed speed.
            one_node = dict(zip(result.budgets or [], result.tokens_per_second or [])).get(1)
            record.update(name=tree.name, paths=[], top_k=tree.top_k, num_nodes=1, fallback=fallback,
                          predicted_accept_length=1.0, predicted_tokens_per_second=one_node)  # fmt: skip
        record["validation"] = {
            "num_prompts": len(validation_prompts),
            "max_new_tokens": max_new_tokens,
            "predicted_accept_length": result.predicted_accept_length,
            "measured_accept_length": tuned["mean_accept_length"],
            "predicted_decode_tokens_per_second": result.predicted_tokens_per_second,
            "measured_decode_tokens_per_second": tuned["decode_tokens_per_second"],
            "results": val,
            "by_domain": by_domain,
            "notes": notes,
        }
        measured_points = {
            k: (v["nodes"], v["mean_accept_length"], v["decode_tokens_per_second"]) for k, v in val.items()
        }
        log(format_validation(record["validation"]))
    else:
        record["validation"] = None
    plots.plot_budget_curves(
        result.budgets, result.accept_length, result.tokens_per_second, result.chosen_nodes, out_dir / "budget_curves.png",
        measured_points,
    )  # fmt: skip
    target = out_file
    target.write_text(json.dumps(record, indent=2) + "\n")
    MedusaTree.from_file(target)  # what we wrote must load
    tps = record["predicted_tokens_per_second"]
    log(
        f"tree: {tree.num_nodes} nodes (depth {tree.depth}, top-{tree.top_k}), predicted accepted length "
        f"{record['predicted_accept_length']:.2f}"
        + (f", predicted {tps:.1f} decode tokens/s" if tps else "")
        + f" -> {target}"
    )
    return record
