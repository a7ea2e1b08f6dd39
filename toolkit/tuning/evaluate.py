"""Checking a tree by decoding: the same held-out prompts through base greedy and each tree, measured accepted length,
tokens/s and exactness, and the tables that print it."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from medusa_toolkit import special_tokens
from medusa_toolkit.decoding.generate import medusa_generate
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning import TuneError

BASELINE = "base greedy (the same decoding path, 1-node tree)"


@torch.inference_mode()
def base_greedy(
    model: MedusaModel, input_ids: list[int], max_new_tokens: int, eos: set[int], attn: str | None = None
) -> tuple[list[int], float, float]:
    """Plain greedy decoding with the base alone: (new tokens, wall s, prefill s). The one baseline every Medusa speed
    is measured against: the same decoding path as Medusa's (the 1-node tree, compiled where Medusa is compiled), so
    a speed-up measures the heads and the tree, not a faster loop."""
    out = medusa_generate(model, torch.as_tensor(input_ids)[None], max_new_tokens, tree=MedusaTree.chain(0),
                          eos_token_id=list(eos) or [], attn_implementation=attn)  # fmt: skip
    return out.sequences[0, len(input_ids) :].tolist(), out.wall_time, out.prefill_time


def validate(
    model: MedusaModel,
    trees: dict[str, MedusaTree],
    prompts: list[list[int]],
    max_new_tokens: int,
    attn: str | None = None,
    progress: bool = True,
    domains: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Decode the same prompts with base greedy (`BASELINE`) and each tree; measured accepted length, tokens/s,
    exactness. Per prompt, every decoder runs back to back, so a load that comes and goes hits them alike.

    tokens_per_second is end to end (prefill included); decode_tokens_per_second leaves the prefill (and the token
    it yields) out, which is what the latency-based prediction describes. With `domains` (one per prompt) the result
    also holds `by_domain`: {domain: {decoder: the same summary}} (callers pop it).
    """
    if not prompts:
        raise TuneError("no validation prompts")
    eos = set(special_tokens.eos_ids(model))
    domains = domains or ["all"] * len(prompts)
    # Untimed: one short decode per decoder first, so a compiled step's first compile of a tree's shapes (minutes on
    # two cores) is never timed as that tree's speed.
    base_greedy(model, prompts[0], 4, set(), attn)
    for tree in trees.values():
        medusa_generate(model, torch.as_tensor(prompts[0])[None], 4, tree=tree, eos_token_id=[],
                        attn_implementation=attn)  # fmt: skip
    runs: dict[str, list[dict]] = {"base_greedy": [], **{name: [] for name in trees}}  # decoder -> record per prompt
    for ids in tqdm(prompts, desc="validate", unit="prompt", disable=not progress):
        ref, wall, pre = base_greedy(model, ids, max_new_tokens, eos, attn)
        runs["base_greedy"].append({"new": len(ref), "wall": wall, "prefill": pre, "steps": len(ref) - 1,
                                    "accepted": len(ref) - 1, "exact": True})  # fmt: skip
        for name, tree in trees.items():
            out = medusa_generate(model, torch.as_tensor(ids)[None], max_new_tokens, tree=tree,
                                  eos_token_id=list(eos) or [], attn_implementation=attn)  # fmt: skip
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
