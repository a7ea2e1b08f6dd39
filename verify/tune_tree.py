"""Tree tuning: choose the Medusa tree from measured joint acceptance and measured verification latency.

1. Calibrate (medusa_toolkit.verify.calibration): empirical joint acceptance probability p(path) of every path.
2. For every node budget n (tree tokens per step, root included) the best prefix-closed tree is the n - 1 most likely
   paths (see `greedy_order` for the proof); its expected accepted length is 1 + the sum of their p.
3. Speed objective: time one real verification step (propose + heads/base forward over the n tree tokens with the
   tree mask + accept + cache compaction) on this device, at a representative prefix length and batch size, on a grid
   of budgets; interpolate; pick the n maximising expected accepted length / step time.
4. Validate: decode held-out prompts with the chosen tree, the `mc_sim_7b_63` and `chain-N` presets and plain greedy,
   and report predicted vs measured accepted length and tokens/s.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.decoding import (
    accept_greedy,
    attn_inputs,
    keep_cache_positions,
    medusa_generate,
    prefill,
    propose,
    use_attention,
    verify,
)
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.medusa_model import MedusaModel
from medusa_toolkit.tree import MedusaTree
from medusa_toolkit.verify.calibration import Calibration, CalibrationError, calibrate_prompts, calibrate_sequences

LATENCY_GRID = (1, 2, 4, 8, 16, 32, 48, 64)
TREE_FILE = "tree.json"
MAX_STORED_NODES = 256  # joint acceptance table entries kept in tree.json (the most likely paths)


class TuneError(ToolkitError, ValueError):
    """Tree tuning cannot run; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance objective


def greedy_order(calib: Calibration) -> list[tuple[int, ...]]:
    """Every path with a nonzero count, best first; the optimal tree with budget n is the first n - 1 paths.

    Order: count descending, then depth ascending, then ranks. Why taking a prefix of this order is optimal: the
    objective 1 + sum(p) is additive over nodes, so for n - 1 nodes no set of any shape beats the n - 1 largest p.
    That set is prefix-closed: a child's matching positions are a subset of its parent's (the child's path extends
    the parent's), so count(child) <= count(parent) holds exactly for empirical counts, and on a tie the parent wins
    on depth; hence every parent comes before its child in the order. Equivalently, repeatedly adding the best
    frontier node (the greedy algorithm) picks this same sequence, because the best remaining node's parent is always
    already in. Paths with count 0 add nothing, so a budget larger than the nonzero paths gets no extra nodes.
    """
    return sorted(calib.path_counts, key=lambda p: (-calib.path_counts[p], len(p), p))


def accept_length_curve(calib: Calibration, order: list[tuple[int, ...]], max_nodes: int) -> list[float]:
    """Expected accepted length of the optimal tree for n = 1 .. max_nodes tree tokens (root included)."""
    probs = [calib.probability(p) for p in order[: max(0, max_nodes - 1)]]
    curve = [1.0]
    for p in probs:
        curve.append(curve[-1] + p)
    curve += [curve[-1]] * (max_nodes - len(curve))  # no more nonzero paths: bigger budgets gain nothing
    return curve[:max_nodes]


def tree_for_budget(order: list[tuple[int, ...]], n: int, name: str | None = None) -> MedusaTree:
    """The optimal tree with n tree tokens (root included)."""
    return MedusaTree.from_paths(order[: max(0, n - 1)], name=name or f"tuned-{n}")


# ----------------------------------------------------------------------------------------------------------------------
# Speed objective


def device_name(device: torch.device) -> str:
    """Human-readable accelerator or CPU name, with the thread count for CPUs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_step_times(
    model: MedusaModel,
    trees: dict[int, MedusaTree],
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    progress: bool = True,
) -> dict[int, float]:
    """Median wall time (s) of one verification step for each tree, with a KV cache of `prefix_length` tokens.

    Batch 1 times the real decoding step (propose, verify, accept, cache compaction, from medusa_toolkit.decoding);
    batch > 1 times the tree forward alone (batched decoding has its own benchmark, benchmarks/bench_batch.py), which dominates the step.
    """
    device = model.device
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.base.config.vocab_size, (batch_size, prefix_length), generator=gen).to(device)
    times: dict[int, float] = {}
    with use_attention(model, attn) as attn_name:
        if batch_size > 1 and attn_name == "medusa_flash_decoding":
            raise TuneError(
                "latency at batch_size > 1 is measured with sdpa/eager only; set model.attn_implementation: sdpa"
            )
        cache = DynamicCache(config=model.base.config)
        root, medusa_logits = prefill(model, prefix[:1], cache) if batch_size == 1 else (None, None)
        if batch_size > 1:
            model(
                prefix,
                position_ids=torch.arange(prefix_length, device=device)[None].expand(batch_size, -1),
                cache=cache,
                logits_to_keep=1,
            )
            root = prefix[0, -1:]
            medusa_logits = model(
                prefix[:1, -1:], position_ids=torch.tensor([[prefix_length - 1]], device=device)
            ).medusa_logits[:, 0, -1]
        bar = tqdm(trees.items(), desc="latency", unit="budget", disable=not progress)
        for n, tree in bar:
            buffers = tree.buffers(device)
            samples = []
            for i in range(warmup + repeats):
                _sync(device)
                start = time.perf_counter()
                tokens = propose(root, medusa_logits, tree, buffers)
                if batch_size == 1:
                    # the loop body of medusa_generate, minus output bookkeeping
                    logits, hidden = verify(model, tokens, prefix_length, buffers, cache, attn_name)
                    step = accept_greedy(tokens, logits, buffers)
                    keep_cache_positions(cache, prefix_length, step.accepted_nodes)
                    model.medusa_logits(hidden[step.accepted_nodes[-1]])
                else:
                    positions = (prefix_length + buffers.position_offsets)[None].expand(batch_size, -1)
                    model(tokens[None].expand(batch_size, -1), position_ids=positions, cache=cache, with_medusa=False,
                          **attn_inputs(attn_name, buffers, prefix_length, model.dtype))  # fmt: skip
                _sync(device)
                if i >= warmup:
                    samples.append(time.perf_counter() - start)
                extra = cache.get_seq_length() - prefix_length
                if extra > 0:
                    cache.crop(-extra)  # back to the prefix for the next repeat
            times[n] = float(np.median(samples))
            bar.set_postfix(nodes=n, ms=f"{1e3 * times[n]:.1f}")
    return times


def latency_grid(max_nodes: int, grid: tuple[int, ...] | list[int] = LATENCY_GRID) -> list[int]:
    """The budgets to time: the grid points up to max_nodes, plus 1 and max_nodes themselves."""
    return sorted({1, max_nodes, *(g for g in grid if g <= max_nodes)})


# ----------------------------------------------------------------------------------------------------------------------
# Choosing


@dataclass
class TuneResult:
    tree: MedusaTree
    chosen_nodes: int
    budgets: list[int]  # 1 .. max budget
    accept_length: list[float]  # expected accepted length per budget
    step_time: list[float] | None = None  # interpolated seconds per step (speed objective)
    measured_latency: dict[int, float] = field(default_factory=dict)  # the timed grid

    @property
    def tokens_per_second(self) -> list[float] | None:
        if self.step_time is None:
            return None
        return [a / t for a, t in zip(self.accept_length, self.step_time)]

    @property
    def predicted_accept_length(self) -> float:
        return self.accept_length[self.chosen_nodes - 1]

    @property
    def predicted_tokens_per_second(self) -> float | None:
        tps = self.tokens_per_second
        return None if tps is None else tps[self.chosen_nodes - 1]


def choose_tree(
    model: MedusaModel,
    calib: Calibration,
    max_nodes: int = 64,
    objective: str = "speed",
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    grid: tuple[int, ...] | list[int] = LATENCY_GRID,
    repeats: int = 5,
    progress: bool = True,
) -> TuneResult:
    """The optimal tree for the objective: max expected accepted length (acceptance) or predicted tokens/s (speed)."""
    if objective not in ("speed", "acceptance"):
        raise TuneError(f"objective {objective!r} is unknown; use 'speed' or 'acceptance'")
    if max_nodes < 1:
        raise TuneError(f"max nodes must be >= 1 (the root), got {max_nodes}")
    order = greedy_order(calib)
    top = min(max_nodes, len(order) + 1)  # beyond the nonzero paths a bigger tree only costs time
    budgets = list(range(1, top + 1))
    curve = accept_length_curve(calib, order, top)
    if objective == "acceptance":
        return TuneResult(tree_for_budget(order, top, f"tuned-acceptance-{top}"), top, budgets, curve)
    timed = latency_grid(top, grid)
    measured = measure_step_times(
        model,
        {n: tree_for_budget(order, n) for n in timed},
        prefix_length,
        batch_size,
        attn,
        repeats,
        progress=progress,
    )
    step = np.interp(budgets, timed, [measured[n] for n in timed]).tolist()
    tps = [a / t for a, t in zip(curve, step)]
    best = int(np.argmax(tps)) + 1
    return TuneResult(tree_for_budget(order, best, f"tuned-speed-{best}"), best, budgets, curve, step, measured)


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
    _sync(device)
    start = time.perf_counter()
    out = model.base(
        x, position_ids=torch.arange(x.shape[1], device=device)[None], cache=cache, use_cache=True, logits_to_keep=1
    )
    tok = out.logits[0, -1].argmax()
    _sync(device)
    prefill_time = time.perf_counter() - start
    new = [int(tok)]
    pos = x.shape[1]
    while len(new) < max_new_tokens and new[-1] not in eos:
        out = model.base(tok.view(1, 1), position_ids=torch.tensor([[pos]], device=device), cache=cache, use_cache=True)
        tok = out.logits[0, -1].argmax()
        new.append(int(tok))
        pos += 1
    _sync(device)
    return new, time.perf_counter() - start, prefill_time


def _eos_set(model: MedusaModel) -> set[int]:
    eos = getattr(model.base.generation_config, "eos_token_id", None)
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def validate(
    model: MedusaModel,
    trees: dict[str, MedusaTree],
    prompts: list[list[int]],
    max_new_tokens: int,
    attn: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Decode the same prompts with base greedy and each tree; measured accepted length, tokens/s, exactness.

    tokens_per_second is end to end (prefill included); decode_tokens_per_second leaves the prefill (and the token
    it yields) out, which is what the latency-based prediction describes.
    """
    if not prompts:
        raise TuneError("no validation prompts")
    eos = _eos_set(model)
    results: dict[str, dict[str, Any]] = {}
    greedy: list[list[int]] = []
    totals = {"new": 0, "wall": 0.0, "prefill": 0.0}
    for ids in tqdm(prompts, desc="validate base", unit="prompt", disable=not progress):
        new, wall, pre = base_greedy(model, ids, max_new_tokens, eos)
        greedy.append(new)
        totals["new"] += len(new)
        totals["wall"] += wall
        totals["prefill"] += pre
    results["base_greedy"] = _summary(totals, steps=totals["new"] - len(prompts), nodes=1, exact=True)
    for name, tree in trees.items():
        totals = {"new": 0, "wall": 0.0, "prefill": 0.0}
        steps, accepted, exact = 0, 0, True
        for ids, ref in tqdm(list(zip(prompts, greedy)), desc=f"validate {name}", unit="prompt", disable=not progress):
            out = medusa_generate(model, torch.as_tensor(ids)[None], max_new_tokens, tree=tree, eos_token_id=list(eos) or None,
                                  attn_implementation=attn)  # fmt: skip
            exact &= out.sequences[0, len(ids) :].tolist() == ref
            totals["new"] += out.new_tokens
            totals["wall"] += out.wall_time
            totals["prefill"] += out.prefill_time
            steps += out.steps
            accepted += sum(out.accept_lengths)
        results[name] = _summary(totals, steps, tree.num_nodes, exact, accepted / max(1, steps))
    base_tps = results["base_greedy"]["tokens_per_second"]
    for r in results.values():
        r["speedup_vs_base"] = r["tokens_per_second"] / base_tps if base_tps else None
    return results


def _summary(t: dict, steps: int, nodes: int, exact: bool, accept: float = 1.0) -> dict[str, Any]:
    decode_time = t["wall"] - t["prefill"]
    return {
        "nodes": nodes,
        "mean_accept_length": accept,
        "new_tokens": t["new"],
        "steps": steps,
        "tokens_per_second": t["new"] / t["wall"] if t["wall"] > 0 else None,
        "decode_tokens_per_second": steps * accept / decode_time if decode_time > 0 and steps else None,
        "identical_to_greedy": exact,
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


def tune_and_write(
    model: MedusaModel,
    calib: Calibration,
    out_dir: str | Path,
    *,
    max_nodes: int = 64,
    objective: str = "speed",
    prefix_length: int = 256,
    batch_size: int = 1,
    attn: str | None = None,
    validation_prompts: list[list[int]] | None = None,
    max_new_tokens: int = 64,
    calibration_source: str = "",
    out_file: str | Path | None = None,
    repeats: int = 5,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Choose the tree, validate it, write tree.json (or `out_file`) and the PNG plots into out_dir; return tree.json."""
    from medusa_toolkit.verify import tree_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = choose_tree(
        model, calib, max_nodes, objective, prefix_length, batch_size, attn, repeats=repeats, progress=progress
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
    tree_plots.plot_acceptance_heatmap(calib.head_accuracy(), out_dir / "acceptance_heatmap.png")
    tree_plots.plot_tree(tree.paths, probs, out_dir / "tree.png")
    measured_points = None
    if validation_prompts:
        trees, notes = comparison_trees(tree, model.num_heads)
        val = validate(model, trees, validation_prompts, max_new_tokens, attn, progress)
        tuned = val["tuned"]
        record["validation"] = {
            "num_prompts": len(validation_prompts),
            "max_new_tokens": max_new_tokens,
            "predicted_accept_length": result.predicted_accept_length,
            "measured_accept_length": tuned["mean_accept_length"],
            "predicted_decode_tokens_per_second": result.predicted_tokens_per_second,
            "measured_decode_tokens_per_second": tuned["decode_tokens_per_second"],
            "results": val,
            "notes": notes,
        }
        measured_points = {
            k: (v["nodes"], v["mean_accept_length"], v["decode_tokens_per_second"]) for k, v in val.items()
        }
        log(format_validation(record["validation"]))
    else:
        record["validation"] = None
    tree_plots.plot_budget_curves(
        result.budgets, result.accept_length, result.tokens_per_second, result.chosen_nodes, out_dir / "budget_curves.png",
        measured_points,
    )  # fmt: skip
    target = Path(out_file) if out_file is not None else out_dir / TREE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
    MedusaTree.from_file(target)  # what we wrote must load
    tps = result.predicted_tokens_per_second
    log(
        f"tree: {tree.num_nodes} nodes (depth {tree.depth}, top-{tree.top_k}), predicted accepted length "
        f"{result.predicted_accept_length:.2f}"
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
    return "\n".join(lines + [format_results(v["results"], v["notes"])])


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


EVAL_SPLITS = ("eval", "validation", "test", "heldout")


def load_eval_rows(
    data_dir: str | Path, allow_train: bool = False
) -> tuple[list[list[int]], list[list[int]], str] | None:
    """(sequences, loss masks, description) from the data stage's held-out split, or None when there is none.

    Accepts a DatasetDict saved with save_to_disk (split eval/validation/test/heldout) or a sub-folder of that name;
    with `allow_train` a plain Dataset is used whole (optimistic: the heads may have trained on it).
    """
    import datasets

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TuneError(f"data dir not found: {data_dir}")
    ds, where = None, ""
    for split in EVAL_SPLITS:
        if (data_dir / split / "state.json").is_file():  # a Dataset saved with save_to_disk
            ds, where = _load_from_disk(data_dir / split), f"{data_dir}/{split}"
            break
    if ds is None:
        loaded = _load_from_disk(data_dir)
        if isinstance(loaded, datasets.DatasetDict):
            split = next((s for s in EVAL_SPLITS if s in loaded), None)
            if split is not None:
                ds, where = loaded[split], f"{data_dir}[{split}]"
            elif allow_train and "train" in loaded:
                ds, where = loaded["train"], f"{data_dir}[train] (no held-out split)"
        elif allow_train:
            ds, where = loaded, f"{data_dir} (no held-out split)"
    if ds is None:
        return None
    if len(ds) == 0:
        raise CalibrationError(
            f"{where} is empty: no calibration rows; re-run the data stage with data.eval_fraction > 0"
        )
    if "input_ids" not in ds.column_names:
        raise TuneError(f"{where} has no input_ids column (columns: {', '.join(ds.column_names)})")
    ids = ds["input_ids"]
    masks = ds["loss_mask"] if "loss_mask" in ds.column_names else [[1] * len(x) for x in ids]
    return [list(x) for x in ids], [list(m) for m in masks], where


def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise TuneError(f"{path} holds no dataset saved with save_to_disk (expected input_ids, loss_mask)") from None
    except IndexError:  # datasets cannot reload a saved dataset with zero rows (no shards)
        raise CalibrationError(
            f"{path} is empty: no calibration rows; re-run the data stage with data.eval_fraction > 0"
        ) from None


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


def calibrate_and_split(
    model: MedusaModel,
    *,
    depth: int,
    top_k: int,
    num_calibration: int,
    num_validation: int,
    max_new_tokens: int,
    rows: tuple[list[list[int]], list[list[int]], str] | None = None,
    prompts: list[list[int]] | None = None,
    prompt_source: str = "",
    progress: bool = True,
) -> tuple[Calibration, list[list[int]], str]:
    """Calibrate on stored rows (one forward each) or on prompts (greedy decoding); return the validation prompts too.

    Validation prompts come after the calibration ones, so the check sees new prompts from the same distribution.
    """
    if rows is not None:
        seqs, masks, where = rows
        if not seqs:
            raise CalibrationError(f"{where} is empty: no calibration rows")
        starts = [min(response_start(m), len(s)) for s, m in zip(seqs, masks)]
        calib = calibrate_sequences(model, seqs[:num_calibration], starts[:num_calibration], depth, top_k, progress)
        rest = list(zip(seqs, starts))[num_calibration:] or list(zip(seqs, starts))
        val = [s[:st] for s, st in rest if st > 0][:num_validation]
        return calib, val, f"data rows {where} ({min(num_calibration, len(seqs))} rows)"
    if not prompts:
        raise CalibrationError(
            f"no calibration prompts ({prompt_source or 'empty list'}); pass --prompts FILE or --data DIR"
        )
    calib = calibrate_prompts(model, prompts[:num_calibration], max_new_tokens, depth, top_k, progress=progress)
    rest = prompts[num_calibration:] or prompts
    return calib, rest[:num_validation], f"{prompt_source} ({min(num_calibration, len(prompts))} prompts, greedy)"


def resolve_depth(max_depth: int | None, num_heads: int) -> int:
    if max_depth is None:
        return num_heads
    if not 1 <= max_depth <= num_heads:
        raise TuneError(f"max depth {max_depth} must be between 1 and the number of heads ({num_heads})")
    return max_depth


def run_tree(cfg: ToolkitConfig, run_dir: Path, out_dir: Path) -> None:
    """The `tree` stage: tune from run_dir/heads on held-out data, write out_dir/tree.json and PNG plots."""
    import torch.distributed as dist

    from medusa_toolkit.heads import MedusaHeads
    from medusa_toolkit.models import load_base_model
    from medusa_toolkit.prompts import load_prompts

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one process measures; others would compete for the same cores and skew the latency
    tc = cfg.tree
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    heads_dir = run_dir / "heads"
    if not heads_dir.is_dir():
        raise TuneError(f"no heads in {heads_dir}; run the 'train' stage first")
    heads = MedusaHeads.from_pretrained(heads_dir)
    if tc.tree != "auto":  # a fixed tree: record it, no tuning
        tree = MedusaTree.resolve(tc.tree, heads.num_heads)
        tree.metadata = {**tree.metadata, "source": tc.tree}
        tree.save(out_dir / TREE_FILE)
        return
    base, tokenizer = load_base_model(
        cfg.model.name_or_path, cfg.model.dtype, cfg.model.device, cfg.model.attn_implementation
    )
    model = MedusaModel(base, heads, tokenizer)
    depth = resolve_depth(tc.max_depth, model.num_heads)
    rows = load_eval_rows(run_dir / "data") if (run_dir / "data").is_dir() else None
    prompts, source = None, ""
    if rows is None:
        total = tc.num_calibration_prompts + tc.num_validation_prompts
        texts = load_prompts("chitchat", split="heldout", num=total)
        prompts = prompt_token_ids(
            tokenizer, texts, cfg.data.use_chat_template, cfg.data.system_prompt, cfg.data.max_prompt_tokens
        )
        source = "chitchat held-out prompts"
    calib, val_prompts, desc = calibrate_and_split(
        model, depth=depth, top_k=tc.top_k, num_calibration=tc.num_calibration_prompts,
        num_validation=tc.num_validation_prompts, max_new_tokens=tc.calibration_max_new_tokens, rows=rows,
        prompts=prompts, prompt_source=source, progress=cfg.logging.progress,
    )  # fmt: skip
    tune_and_write(
        model, calib, out_dir, max_nodes=tc.max_nodes, objective=tc.objective, prefix_length=tc.prefix_length,
        batch_size=tc.batch_size, attn=cfg.model.attn_implementation, validation_prompts=val_prompts,
        max_new_tokens=tc.calibration_max_new_tokens, calibration_source=desc, repeats=tc.latency_repeats,
        progress=cfg.logging.progress,
    )  # fmt: skip
