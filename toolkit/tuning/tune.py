"""Tree tuning, the `tree` stage and `medusa-tune-tree`: choose the Medusa tree from measured joint acceptance and
measured step latency, then check the choice by decoding held-out prompts.

1. Calibrate (medusa_toolkit.tuning.calibration): the empirical joint acceptance probability of every path of head ranks.
2. Search (medusa_toolkit.tuning.search): the optimal tree for every node budget.
3. Time (medusa_toolkit.tuning.timing): one real decoding step per budget on this device; for the speed objective the
   budget with the best predicted tokens/s wins.
4. Validate: decode held-out prompts with the chosen tree, the `mc_sim_7b_63` and `chain-N` presets and plain greedy,
   and report predicted vs measured accepted length and tokens/s.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from medusa_toolkit import data_artefact, special_tokens
from medusa_toolkit.config import ToolkitConfig, TreeConfig
from medusa_toolkit.decoding.generate import medusa_generate
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning.calibration import Calibration, CalibrationError, calibrate_prompts, calibrate_sequences
from medusa_toolkit.tuning.search import TuneResult, choose, greedy_order, tree_for_budget
from medusa_toolkit.tuning.timing import LATENCY_GRID, device_name, latency_grid, measure_step_times, sync

TREE_FILE = "tree.json"
MAX_STORED_NODES = 256  # joint acceptance table entries kept in tree.json (the most likely paths)


class TuneError(ToolkitError, ValueError):
    """Tree tuning cannot run; the message names the problem and the fix."""


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
) -> TuneResult:
    """The optimal tree for the objective: max expected accepted length (acceptance) or predicted tokens/s (speed)."""
    if objective not in ("speed", "acceptance"):
        raise TuneError(f"objective {objective!r} is unknown; use 'speed' or 'acceptance'")
    if max_nodes < 1:
        raise TuneError(f"max nodes must be >= 1 (the root), got {max_nodes}")
    if objective == "acceptance":
        return choose(calib, max_nodes)
    order = greedy_order(calib)
    top = min(max_nodes, len(order) + 1)
    trees = {n: tree_for_budget(order, n) for n in latency_grid(top, grid)}
    latency = measure_step_times(model, trees, prefix_length, batch_size, attn, repeats, progress=progress)
    return choose(calib, max_nodes, latency)


# ----------------------------------------------------------------------------------------------------------------------
# Checking the prediction


@torch.inference_mode()
def base_greedy(
    model: MedusaModel, input_ids: list[int], max_new_tokens: int, eos: set[int]
) -> tuple[list[int], float, float]:
    """Plain greedy decoding with the base alone: (new tokens, wall s, prefill s). The baseline Medusa must beat."""
    device = model.device
    x = torch.as_tensor(input_ids, device=device)[None]
    cache = DynamicCache(config=model.base.config)
    sync(device)
    start = time.perf_counter()
    out = model.base(
        x, position_ids=torch.arange(x.shape[1], device=device)[None], cache=cache, use_cache=True, logits_to_keep=1
    )
    tok = out.logits[0, -1].argmax()
    sync(device)
    prefill_time = time.perf_counter() - start
    new = [int(tok)]
    pos = x.shape[1]
    while len(new) < max_new_tokens and new[-1] not in eos:
        out = model.base(tok.view(1, 1), position_ids=torch.tensor([[pos]], device=device), cache=cache, use_cache=True)
        tok = out.logits[0, -1].argmax()
        new.append(int(tok))
        pos += 1
    sync(device)
    return new, time.perf_counter() - start, prefill_time


def validate(
    model: MedusaModel,
    trees: dict[str, MedusaTree],
    prompts: list[list[int]],
    max_new_tokens: int,
    attn: str | None = None,
    progress: bool = True,
    domains: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Decode the same prompts with base greedy and each tree; measured accepted length, tokens/s, exactness.

    tokens_per_second is end to end (prefill included); decode_tokens_per_second leaves the prefill (and the token
    it yields) out, which is what the latency-based prediction describes. With `domains` (one per prompt) the result
    also holds `by_domain`: {domain: {decoder: the same summary}} (callers pop it).
    """
    if not prompts:
        raise TuneError("no validation prompts")
    eos = set(special_tokens.eos_ids(model))
    domains = domains or ["all"] * len(prompts)
    runs: dict[str, list[dict]] = {"base_greedy": []}  # decoder -> one record per prompt
    greedy: list[list[int]] = []
    for ids in tqdm(prompts, desc="validate base", unit="prompt", disable=not progress):
        new, wall, pre = base_greedy(model, ids, max_new_tokens, eos)
        greedy.append(new)
        runs["base_greedy"].append({"new": len(new), "wall": wall, "prefill": pre, "steps": len(new) - 1,
                                    "accepted": len(new) - 1, "exact": True})  # fmt: skip
    for name, tree in trees.items():
        runs[name] = []
        for ids, ref in tqdm(list(zip(prompts, greedy)), desc=f"validate {name}", unit="prompt", disable=not progress):
            out = medusa_generate(model, torch.as_tensor(ids)[None], max_new_tokens, tree=tree, eos_token_id=list(eos) or None,
                                  attn_implementation=attn)  # fmt: skip
            runs[name].append({"new": out.new_tokens, "wall": out.wall_time, "prefill": out.prefill_time,
                               "steps": out.steps, "accepted": sum(out.accept_lengths),
                               "exact": out.sequences[0, len(ids) :].tolist() == ref})  # fmt: skip
    nodes = {"base_greedy": 1, **{name: tree.num_nodes for name, tree in trees.items()}}

    def summarise(keep: list[bool]) -> dict[str, dict[str, Any]]:
        results = {name: _summary([r for r, k in zip(rs, keep) if k], nodes[name]) for name, rs in runs.items()}
        base_tps = results["base_greedy"]["tokens_per_second"]
        for r in results.values():
            r["speedup_vs_base"] = r["tokens_per_second"] / base_tps if base_tps else None
        return results

    results = summarise([True] * len(prompts))
    if len(set(domains)) > 1:
        results["by_domain"] = {d: summarise([x == d for x in domains]) for d in sorted(set(domains))}
    return results


def _summary(records: list[dict], nodes: int) -> dict[str, Any]:
    new, wall, prefill = (sum(r[k] for r in records) for k in ("new", "wall", "prefill"))
    steps, accepted = sum(r["steps"] for r in records), sum(r["accepted"] for r in records)
    accept = accepted / steps if steps else 1.0
    decode_time = wall - prefill
    return {
        "nodes": nodes,
        "mean_accept_length": accept,
        "new_tokens": new,
        "steps": steps,
        "tokens_per_second": new / wall if wall > 0 else None,
        "decode_tokens_per_second": accepted / decode_time if decode_time > 0 and steps else None,
        "identical_to_greedy": all(r["exact"] for r in records),
    }


def comparison_trees(tuned: MedusaTree, num_heads: int) -> tuple[dict[str, MedusaTree], list[str]]:
    """The tuned tree plus the presets it is compared against on the same heads; notes for presets skipped."""
    trees = {"tuned": tuned}
    notes = []
    preset = MedusaTree.preset("mc_sim_7b_63")
    if num_heads >= preset.depth:
        trees["mc_sim_7b_63"] = preset
    else:
        notes.append(f"mc_sim_7b_63 skipped: it needs {preset.depth} heads, these heads number {num_heads}")
    trees[f"chain-{num_heads}"] = MedusaTree.chain(num_heads)
    return trees, notes


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
        model, calib, tc.max_nodes, objective, prefix_length, batch_size, attn, tc.latency_repeats, progress
    )
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
            "measured": {"nodes": list(result.measured_latency), "step_time_s": list(result.measured_latency.values())},
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


def format_validation(v: dict[str, Any]) -> str:
    """A small table: predicted vs measured, and every compared tree."""
    lines = [
        f"validation on {v['num_prompts']} held-out prompt(s), {v['max_new_tokens']} new tokens each:",
        f"  accepted length: predicted {v['predicted_accept_length']:.2f}, measured {v['measured_accept_length']:.2f}",
    ]
    if v["predicted_decode_tokens_per_second"] and v["measured_decode_tokens_per_second"]:
        lines.append(
            f"  decode tokens/s: predicted {v['predicted_decode_tokens_per_second']:.1f}, "
            f"measured {v['measured_decode_tokens_per_second']:.1f}"
        )
    lines.append(format_results(v["results"], v["notes"]))
    for domain, results in (v.get("by_domain") or {}).items():
        tuned, base = results["tuned"], results["base_greedy"]
        lines.append(
            f"  {domain:<14} tuned accept {tuned['mean_accept_length']:.2f}, {tuned['tokens_per_second'] or 0:.1f} vs "
            f"base {base['tokens_per_second'] or 0:.1f} tok/s = {tuned['speedup_vs_base'] or 0:.2f}x"
        )
    return "\n".join(lines)


def format_results(results: dict[str, dict[str, Any]], notes: list[str] = ()) -> str:
    """One row per decoder: nodes, mean accepted length, end-to-end tokens/s, speedup over base greedy, exactness."""
    lines = [f"  {'decoder':<14}{'nodes':>6}{'accept':>8}{'tok/s':>9}{'x base':>8}  exact"]
    for name, r in results.items():
        tps = r["tokens_per_second"] or float("nan")
        lines.append(
            f"  {name:<14}{r['nodes']:>6}{r['mean_accept_length']:>8.2f}{tps:>9.1f}{r['speedup_vs_base'] or float('nan'):>8.2f}"
            f"  {r['identical_to_greedy']}"
        )
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Calibration inputs and the pipeline stage


def response_start(mask: list[int]) -> int:
    """Index of the first trained (response) token; 1 when the whole row is trained."""
    return next((i for i, m in enumerate(mask) if m), len(mask))


def prompt_token_ids(
    tokenizer, prompts: list[str], use_chat_template: bool, system_prompt: str | None, max_tokens: int
) -> list[list[int]]:
    """Render prompts as decoding sees them (chat template or not), keeping the last `max_tokens` tokens."""
    from medusa_toolkit.prompts import render_prompt

    if tokenizer is None:
        raise TuneError("text prompts need the base model's tokenizer; pass a model folder that has one, or --data DIR")
    return [render_prompt(tokenizer, p, use_chat_template, system_prompt)[-max_tokens:] for p in prompts]


@dataclass
class TuningInputs:
    """What tuning measures on: the calibration, the validation prompts (token ids) with their domains, a description."""

    calibration: Calibration
    validation: list[list[int]]
    domains: list[str] | None
    source: str


def calibration_rows(
    data_dir: str | Path, allow_train: bool = False
) -> tuple[tuple[list[list[int]], list[list[int]], str] | None, str]:
    """((sequences, loss masks, where), "") from a data folder's held-out rows, or (None, why not).

    `allow_train` (a folder the user named with `medusa-tune-tree --data`): without held-out rows its training rows
    are used, with a warning (the heads may have trained on them, so acceptance looks optimistic).
    """
    art = data_artefact.load(data_dir)
    if len(art.heldout):
        return (*data_artefact.token_rows(art.heldout), art.heldout_where), ""
    if allow_train and len(art.train):
        warnings.warn(f"{art.where}: no held-out rows, so calibrating on rows the heads may have trained on; "
                      "acceptance will look optimistic", stacklevel=2)  # fmt: skip
        return (*data_artefact.token_rows(art.train), f"{art.where} (no held-out rows)"), ""
    if allow_train:
        raise CalibrationError(f"{data_dir} is empty: no calibration rows; regenerate it with rows in it")
    return None, f"the data artefact {data_dir} has no held-out rows (data.eval_fraction: 0)"


def calibration_inputs(
    cfg: ToolkitConfig, model: MedusaModel, data_dir: Path | None = None, allow_train: bool = False, log=print
) -> TuningInputs:
    """Calibrate, and pick the validation prompts.

    Calibration: with `tree.calibrate_on: data`, the data stage's held-out rows when `data_dir` has them (one forward
    each: the rows are the base's own greedy text), else `tree.prompts` (greedy decoding). Validation:
    `tree.validation_prompts`: `eval` (default: the repo's multi-domain set from sources never used for training,
    interleaved across chat, instructions, code and math, so the choice is checked on traffic unlike the training
    prompts), `calibration` (further prompts from the calibration source), builtin, chitchat or a file. When both
    come from the eval set, calibration takes the prompts after the validation ones: a tree is never checked on the
    prompts it was fitted to.
    """
    from medusa_toolkit.prompts import eval_prompts, interleave_domains, load_prompts

    tc, d = cfg.tree, cfg.data
    depth = resolve_depth(tc.max_depth, model.num_heads)
    use_rows = tc.calibrate_on == "data" and data_dir is not None and Path(data_dir).is_dir()
    rows, why_not = calibration_rows(data_dir, allow_train) if use_rows else (None, "")
    if why_not:
        log(f"tree: {why_not}; calibrating on tree.prompts ({tc.prompts}) instead")
    n_cal, n_val = tc.num_calibration_prompts, tc.num_validation_prompts

    def render(texts: list[str]) -> list[list[int]]:
        return prompt_token_ids(model.tokenizer, texts, d.use_chat_template, d.system_prompt, d.max_prompt_tokens)

    if rows is not None:
        seqs, masks, where = rows
        starts = [min(response_start(m), len(s)) for s, m in zip(seqs, masks)]
        calib = calibrate_sequences(model, seqs[:n_cal], starts[:n_cal], depth, tc.top_k, cfg.logging.progress)
        rest = list(zip(seqs, starts))[n_cal:] or list(zip(seqs, starts))
        same_source = [s[:st] for s, st in rest if st > 0][:n_val]
        source = f"data rows {where} ({min(n_cal, len(seqs))} rows)"
        log(f"tree: calibrating on {source}")
    else:
        if tc.prompts == "eval" and tc.validation_prompts == "eval":
            texts = load_prompts("eval")[n_val : n_val + n_cal]  # after the ones validation decodes
        elif tc.prompts in ("chitchat", "builtin", "eval"):
            texts = load_prompts(tc.prompts, split="heldout", num=n_cal + n_val)
        else:
            texts = load_prompts("file", path=tc.prompts, field=tc.prompt_field, num=n_cal + n_val)
        prompts = render(texts)
        calib = calibrate_prompts(model, prompts[:n_cal], tc.calibration_max_new_tokens, depth, tc.top_k,
                                  progress=cfg.logging.progress)  # fmt: skip
        same_source = (prompts[n_cal:] or prompts)[:n_val]
        source = f"{tc.prompts} prompts ({min(n_cal, len(prompts))}, greedy)" + (f"; {why_not}" if why_not else "")
    if tc.validation_prompts == "calibration":
        return TuningInputs(calib, same_source, None, source)
    if tc.validation_prompts == "eval":
        pairs = interleave_domains(eval_prompts())[:n_val]
        return TuningInputs(calib, render([p for _, p in pairs]), [dom for dom, _ in pairs], source)
    if tc.validation_prompts in ("chitchat", "builtin"):
        texts = load_prompts(tc.validation_prompts, split="heldout", num=n_val)
    else:
        texts = load_prompts("file", path=tc.validation_prompts, field=tc.prompt_field, num=n_val)
    return TuningInputs(calib, render(texts), None, source)


def resolve_depth(max_depth: int | None, num_heads: int) -> int:
    if max_depth is None:
        return num_heads
    if not 1 <= max_depth <= num_heads:
        raise TuneError(f"max depth {max_depth} must be between 1 and the number of heads ({num_heads})")
    return max_depth


def tune_from_config(
    cfg: ToolkitConfig, heads: str | Path, out_file: Path, data_dir: Path | None = None, allow_train: bool = False
) -> None:
    """What the stage and medusa-tune-tree do: load heads then the base, calibrate, tune, validate, write."""
    from medusa_toolkit.model.base_model import load_base_model
    from medusa_toolkit.model.heads import MedusaHeads

    tc = cfg.tree
    loaded = MedusaHeads.from_pretrained(heads)  # cheap: a bad folder fails before the base loads
    if tc.tree != "auto":  # a fixed tree: record it, no tuning
        tree = MedusaTree.resolve(tc.tree, loaded.num_heads)
        tree.metadata = {**tree.metadata, "source": tc.tree}
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tree.save(out_file)
        return
    resolve_depth(tc.max_depth, loaded.num_heads)
    m = cfg.model
    base, tokenizer = load_base_model(m.name_or_path, m.dtype, m.device, m.attn_implementation)
    model = MedusaModel(base, loaded, tokenizer)
    inputs = calibration_inputs(cfg, model, data_dir, allow_train)
    tune_tree(
        model, inputs.calibration, tc, out_file, attn=m.attn_implementation, calibration_source=inputs.source,
        validation_prompts=inputs.validation if tc.num_validation_prompts else None,
        validation_domains=inputs.domains, progress=cfg.logging.progress,
    )  # fmt: skip


def run_tree(cfg: ToolkitConfig, run_dir: Path, out_dir: Path) -> None:
    """The `tree` stage: tune from run_dir/heads on held-out data, write out_dir/tree.json and PNG plots."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one process measures; others would compete for the same cores and skew the latency
    run_dir = Path(run_dir)
    if not (run_dir / "heads").is_dir():
        raise TuneError(f"no heads in {run_dir / 'heads'}; run the 'train' stage first")
    tune_from_config(cfg, run_dir / "heads", Path(out_dir) / TREE_FILE, run_dir / "data")
