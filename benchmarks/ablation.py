"""Ablation for the demo heads: which data and settings make heads that guess held-out prompts, and at what cost.

One data artefact holds every source (the data stage with configs/ablation-data.yaml: self-written prompts, chitchat
openers, both answered by the base, and chitchat conversations kept as recorded). Heads are trained on subsets of it
with the demo's training settings, and every variant is measured the same way, side by side in one run:
  - cost: trained tokens (head-0 targets, all epochs) per CPU-minute of data + training, the data stage's time split
    over the rows each variant uses (generation for answered rows, one forward for recorded ones);
  - per-head top-1 per domain on the base's own greedy answers to the held-out eval prompts (chat, instructions, code,
    math; never used for training), teacher forced;
  - accepted length and tokens/s vs base greedy per domain, decoding those prompts with small trees (the ones a
    2-core CPU can afford; every output is checked token for token against base greedy).

    medusa-train configs/ablation-data.yaml                 # the data artefact (runs/ablation/data)
    python benchmarks/ablation.py --json runs/ablation/results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

GENERATED = ("self", "chitchat")
RECORDED = ("chitchat:recorded",)
# name -> (sources used, share of the generated rows used, overrides of the demo config)
VARIANTS = {
    "generated-half": (GENERATED, 0.5, {}),
    "generated": (GENERATED, 1.0, {}),
    "recorded": (RECORDED, 1.0, {}),
    "generated+recorded": (GENERATED + RECORDED, 1.0, {}),
    "generated, vocab 8k": (GENERATED, 1.0, {"heads.truncated_vocab_size": 8192}),
    "generated+recorded, vocab 8k": (GENERATED + RECORDED, 1.0, {"heads.truncated_vocab_size": 8192}),
    "generated+recorded, vocab 8k, 4 epochs": (
        GENERATED + RECORDED, 1.0, {"heads.truncated_vocab_size": 8192, "train.epochs": 4.0}
    ),
    "generated, vocab 8k, 4 epochs": (GENERATED, 1.0, {"heads.truncated_vocab_size": 8192, "train.epochs": 4.0}),
    "generated, vocab 8k, per-head lm_head": (
        GENERATED, 1.0, {"heads.truncated_vocab_size": 8192, "heads.head_type": "per_head_lm_head"}
    ),
}  # fmt: skip


def subset(data_dir: Path, sources: tuple[str, ...], generated_share: float, out: Path) -> dict[str, int]:
    """Write the rows of `sources` (the first `generated_share` of the generated ones) as a data artefact in `out`;
    what it holds: rows, trained tokens (training rows) and response tokens (all rows) of each kind, self-written
    prompts."""
    import datasets

    ds = datasets.load_from_disk(str(data_dir))
    generated = [i for i, s in enumerate(ds["source"]) if s in sources and s not in RECORDED]
    keep = set(generated[: round(len(generated) * generated_share)])
    keep |= {i for i, s in enumerate(ds["source"]) if s in sources and s in RECORDED}
    part = ds.select(sorted(keep))
    part.save_to_disk(str(out))  # load_data reads it as a data artefact (the stage machinery is not involved)
    count = defaultdict(int)
    for row in part:
        kind = "recorded" if row["source"] in RECORDED else "generated"
        count[f"{kind}_rows"] += 1
        count["self_prompts"] += row["source"] == "self"
        count[f"{kind}_tokens"] += 0 if row["heldout"] else sum(row["loss_mask"])
        # what the data stage paid for: generated response tokens, or every token of a recorded row (one forward)
        count[f"{kind}_stage_tokens"] += (
            len(row["input_ids"]) - row["prompt_length"] if kind == "generated" else len(row["input_ids"])
        )
    return dict(count)


def data_seconds(summary: dict, counts: dict[str, int], s_per_self_prompt: float) -> float:
    """The data stage's time for a subset, from the stage's measured rates: generation tokens/s for its answers, the
    forward's tokens/s for its recorded rows, plus `s_per_self_prompt` per self-written prompt."""
    gen_rate = summary.get("generation_tokens_per_s_rank0") or float("inf")
    text_rate = summary.get("text_tokens_per_s_rank0") or float("inf")
    return (
        counts.get("generated_stage_tokens", 0) / gen_rate
        + counts.get("recorded_stage_tokens", 0) / text_rate
        + counts.get("self_prompts", 0) * s_per_self_prompt
    )


def eval_answers(model, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base's greedy answer ids) per prompt."""
    from medusa_toolkit import special_tokens
    from medusa_toolkit.tuning.evaluate import base_greedy

    eos = set(special_tokens.eos_ids(model))
    return [(ids, base_greedy(model, ids, max_new_tokens, eos)[0]) for ids in prompts]


@torch.no_grad()
def head_top1(model, answers, domains: list[str], hidden_cache: dict) -> dict[str, list[float]]:
    """Per domain, each head's top-1 accuracy on the answers' positions (head k at t guesses the token at t + k + 2)."""
    hits: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    for n, ((prompt, answer), domain) in enumerate(zip(answers, domains)):
        ids = torch.tensor([prompt + answer])
        if n not in hidden_cache:
            hidden_cache[n] = model.base.get_decoder()(input_ids=ids).last_hidden_state[0]
        hidden = hidden_cache[n]
        guesses = model.medusa_logits(hidden).argmax(-1)  # [heads, T]
        start = len(prompt)  # the first answer token is the base's; heads guess from there on
        h = hits.setdefault(domain, torch.zeros(model.num_heads))
        t = totals.setdefault(domain, torch.zeros(model.num_heads))
        for k in range(model.num_heads):
            targets = ids[0, start + k + 1 :]
            got = guesses[k, start - 1 : start - 1 + len(targets)]
            h[k] += (got == targets).sum()
            t[k] += len(targets)
    return {d: (hits[d] / totals[d].clamp(min=1)).tolist() for d in sorted(hits)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="runs/ablation/data", help="the data artefact holding every source")
    p.add_argument("--config", default="configs/smollm2-135m.yaml", help="training settings (the demo's)")
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + "; ".join(VARIANTS))
    p.add_argument("--num-prompts", type=int, default=16, help="eval prompts, interleaved across the 4 domains")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--trees", default="[[0]];[[0],[1]];[[0],[0,0]]", help="trees decoded per variant, ;-separated")
    p.add_argument(
        "--s-per-self-prompt", type=float, default=0.29,
        help="data-stage seconds per kept self-written prompt (default: the idle 512-prompt demo run at batch 64 in "
        "RESULTS.md, 112 s for 384; it was 0.94 s before the data stage sampled prompts itself)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from medusa_toolkit.config import load_config
    from medusa_toolkit.model.base_model import load_base_model
    from medusa_toolkit.model.medusa_model import MedusaModel
    from medusa_toolkit.model.tree import MedusaTree
    from medusa_toolkit.prompts import eval_prompts, interleave_domains, render_prompt
    from medusa_toolkit.train.trainer import train
    from medusa_toolkit.tuning.evaluate import validate
    from medusa_toolkit.tuning.timing import device_name

    data_dir = Path(args.data)
    summary = json.loads((data_dir / "data_summary.json").read_text())
    names = args.variants.split(";") if args.variants else list(VARIANTS)
    base_cfg = load_config(args.config, ["logging.progress=false", "logging.wandb_mode=disabled"])
    base, tokenizer = load_base_model(base_cfg.model.name_or_path, base_cfg.model.dtype)
    pairs = interleave_domains(eval_prompts())[: args.num_prompts]
    domains = [d for d, _ in pairs]
    prompts = [render_prompt(tokenizer, text, True, base_cfg.data.system_prompt) for _, text in pairs]
    print(f"# ablation on {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads; "
          f"{len(prompts)} eval prompts ({', '.join(sorted(set(domains)))}), {args.max_new_tokens} new tokens")  # fmt: skip
    results, hidden_cache, answers = {}, {}, None
    for name in names:
        sources, share, overrides = VARIANTS[name]
        with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
            run_dir = Path(tmp)
            counts = subset(data_dir, sources, share, run_dir / "data")
            cfg = load_config(
                args.config,
                ["logging.progress=false", "logging.wandb_mode=disabled", f"output_dir={tmp}",
                 *(f"{k}={v}" for k, v in overrides.items())],
            )  # fmt: skip
            start = time.perf_counter()
            heads = train(cfg, run_dir, run_dir / "heads")
            train_s = time.perf_counter() - start
            training = json.loads((run_dir / "heads" / "training_summary.json").read_text())
            shutil.rmtree(run_dir / "teacher_cache", ignore_errors=True)
        model = MedusaModel(base, heads, tokenizer)
        if answers is None:
            answers = eval_answers(model, prompts, args.max_new_tokens)
        top1 = head_top1(model, answers, domains, hidden_cache)
        trees = {spec: MedusaTree.from_paths(json.loads(spec)) for spec in args.trees.split(";")}
        decoded = validate(model, trees, prompts, args.max_new_tokens, progress=False, domains=domains)
        by_domain = decoded.pop("by_domain")
        data_s = data_seconds(summary, counts, args.s_per_self_prompt)
        minutes = (data_s + train_s) / 60
        results[name] = {
            "rows": counts,
            "target_tokens": training["target_tokens"],
            "data_s": data_s,
            "train_s": train_s,
            "target_tokens_per_cpu_minute": training["target_tokens"] / minutes,
            "unique_target_tokens_per_cpu_minute": (
                counts.get("generated_tokens", 0) + counts.get("recorded_tokens", 0)
            ) / minutes,
            "heldout_top1": training["final_heldout"].get("top1"),
            "eval_top1_by_domain": top1,
            "decoding": decoded,
            "decoding_by_domain": by_domain,
        }  # fmt: skip
        r = results[name]
        mean_top1 = [sum(v[k] for v in top1.values()) / len(top1) for k in range(model.num_heads)]
        print(f"\n## {name}: {counts}")
        print(f"  cost: data {data_s:.0f} s + train {train_s:.0f} s -> {r['target_tokens_per_cpu_minute']:.0f} trained "
              f"tokens/CPU-min ({r['unique_target_tokens_per_cpu_minute']:.0f} unique)")  # fmt: skip
        print("  eval top-1 per head (mean of domains): " + ", ".join(f"{a:.3f}" for a in mean_top1))
        for d, acc in top1.items():
            line = ", ".join(f"{a:.2f}" for a in acc)
            dec = "; ".join(
                f"{t} accept {v['mean_accept_length']:.2f} speed {v['speedup_vs_base']:.2f}x"
                for t, v in by_domain[d].items() if t != "base_greedy"
            )  # fmt: skip
            print(f"  {d:13s} top-1 {line} | {dec}")
        for t, v in decoded.items():
            if t != "base_greedy":
                exact = "exact" if v["identical_to_greedy"] else "NOT EXACT"
                print(
                    f"  all           {t}: accept {v['mean_accept_length']:.2f}, {v['speedup_vs_base']:.2f}x ({exact})"
                )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(v["identical_to_greedy"] for r in results.values() for v in r["decoding"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
