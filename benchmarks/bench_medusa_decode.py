"""Medusa decoding speed on this machine: base greedy vs the tuned tree vs mc_sim_7b_63 vs chain-N.

Same held-out prompts for every decoder, one run each (after a short warm-up), exactness checked against the base's
greedy tokens, reported overall and per domain: the benchmark prompts are the repo's evaluation set (chat, instructions,
code, math; never used for training), `--num-prompts` of them interleaved across the domains. The tuned tree is read
from --tree, or tuned here (speed objective) on chitchat held-out prompts.

    python benchmarks/bench_medusa_decode.py                       # demo heads: runs/smollm2-135m/heads
    python benchmarks/bench_medusa_decode.py --heads DIR [--tree tree.json]
    python benchmarks/bench_medusa_decode.py --fresh-heads         # untrained heads: checks the script, not the speed

Every decoder of the toolkit runs through the compiled step by default (`--compile on`; `off` times the eager path);
the same prompts also go through transformers' own eager `generate()`, the peer a user would otherwise run.

Goals (2-core CPU, SmolLM2-135M fp32, trained demo heads, averaged over domains): compiled base greedy >= 2x eager
`generate()`; tuned >= 2.3x eager `generate()` and >= 1.15x the compiled base greedy, >= 1.0x on every domain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEMO_RUN = Path("runs/smollm2-135m")


def main(argv: list[str] | None = None) -> int:
    from medusa_toolkit.config import ATTN_IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--heads", default=None, help=f"heads folder (default {DEMO_RUN}/heads)")
    p.add_argument(
        "--fresh-heads", action="store_true", help="use untrained heads (init from lm_head) to test the script"
    )
    p.add_argument(
        "--tree", default=None, help=f"tuned tree.json (default {DEMO_RUN}/tree/tree.json if present, else tune here)"
    )
    p.add_argument("--num-prompts", type=int, default=16, help="eval prompts, interleaved across the 4 domains")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--calibration-prompts", type=int, default=24)
    p.add_argument("--max-nodes", type=int, default=64)
    p.add_argument("--prefix-length", type=int, default=256)
    p.add_argument("--attn", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", default="on", choices=("auto", "on", "off"), help="model.compile for every decoder")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from medusa_toolkit import MedusaHeads, MedusaModel, MedusaTree, load_base_model, special_tokens
    from medusa_toolkit.decoding.compiled import compile_decoding
    from medusa_toolkit.prompts import eval_prompts, interleave_domains, load_prompts
    from medusa_toolkit.tuning.calibration import calibrate_prompts
    from medusa_toolkit.tuning.evaluate import base_greedy, comparison_trees, format_results, validate
    from medusa_toolkit.tuning.inputs import prompt_token_ids
    from medusa_toolkit.tuning.timing import device_name
    from medusa_toolkit.tuning.tune import choose_tree

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_base_model(args.base, attn_implementation=args.attn)
    if args.fresh_heads:
        heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4)
        heads.init_from_lm_head(base.get_output_embeddings().weight)
        heads_name = "fresh (untrained)"
    else:
        heads_dir = Path(args.heads) if args.heads else DEMO_RUN / "heads"
        if not heads_dir.is_dir():
            sys.exit(f"no heads at {heads_dir}: train the demo (make demo) or pass --heads DIR (or --fresh-heads)")
        heads, heads_name = MedusaHeads.from_pretrained(heads_dir), str(heads_dir)
    model = MedusaModel(base, heads, tok)
    compiled = compile_decoding(model, args.compile, args.attn)

    calib_ids = prompt_token_ids(tok, load_prompts("chitchat", split="heldout", num=args.calibration_prompts), True,
                                 None, 512)  # fmt: skip
    pairs = interleave_domains(eval_prompts())[: args.num_prompts]
    bench_ids = prompt_token_ids(tok, [t for _, t in pairs], True, None, 512)
    domains = [d for d, _ in pairs]
    tree_file = (
        Path(args.tree)
        if args.tree
        else (DEMO_RUN / "tree" / "tree.json" if not args.fresh_heads and not args.heads else None)
    )
    if tree_file is not None and tree_file.is_file():
        tuned = MedusaTree.from_file(tree_file)
        source = str(tree_file)
    else:
        print(f"tuning a tree here ({args.calibration_prompts} calibration prompts, speed objective) ...")
        calib = calibrate_prompts(model, calib_ids, args.max_new_tokens, model.num_heads, 10)
        result = choose_tree(model, calib, args.max_nodes, "speed", args.prefix_length, 1, args.attn)
        tuned, source = result.tree, f"tuned here: predicted accept {result.predicted_accept_length:.2f}"
    trees, notes = comparison_trees(tuned, model.num_heads)
    for n in (2, 3):
        if n < model.num_heads:
            trees[f"chain-{n}"] = MedusaTree.chain(n)

    # warm-up: one short decode per decoder, so no decoder pays first-call costs in the timed run
    from medusa_toolkit import medusa_generate

    base_greedy(model, bench_ids[0], 8, set())
    for tree in trees.values():
        medusa_generate(model, torch.as_tensor(bench_ids[0])[None], 8, tree=tree, attn_implementation=args.attn)

    eos = set(special_tokens.eos_ids(model))
    generate_hf(model, bench_ids[0], 8, eos)
    results = validate(model, trees, bench_ids, args.max_new_tokens, args.attn, domains=domains)
    by_domain = results.pop("by_domain", {})
    hf = {"all": [0, 0.0, 0]}  # domain -> [new tokens, seconds, prompts whose tokens equal base greedy's]
    for ids, domain in zip(bench_ids, domains):
        new, seconds = generate_hf(model, ids, args.max_new_tokens, eos)
        same = int(new == base_greedy(model, ids, args.max_new_tokens, eos, args.attn)[0])
        for key in ("all", domain):
            hf.setdefault(key, [0, 0.0, 0])
            hf[key] = [hf[key][0] + len(new), hf[key][1] + seconds, hf[key][2] + same]
    summary = {
        "device": device_name(model.device),
        "base": args.base,
        "heads": heads_name,
        "tuned_tree": {
            "source": source,
            "nodes": tuned.num_nodes,
            "depth": tuned.depth,
            "paths": [list(q) for q in tuned.paths],
        },
        "compiled": compiled,
        "hf_generate": {d: {"tokens_per_second": n / s, "same_as_base_greedy": k} for d, (n, s, k) in hf.items()},
        "num_prompts": len(bench_ids),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "by_domain": by_domain,
    }
    print(
        f"\n{summary['device']} | base {args.base} | heads {heads_name} | tuned tree: {tuned.num_nodes} nodes ({source})"
        f" | {'compiled' if compiled else 'eager'} step"
    )
    print(format_results(results, notes))
    hf_tps = {d: v["tokens_per_second"] for d, v in summary["hf_generate"].items()}
    print(f"  {'hf generate()':<14}{1:>6}{'':>8}{hf_tps['all']:>9.1f}  (eager transformers; same tokens as base "
          f"greedy on {hf['all'][2]}/{len(bench_ids)} prompts)")  # fmt: skip
    for domain, per in by_domain.items():
        t, b = per["tuned"], per["base_greedy"]
        print(f"  {domain:<13} tuned accept {t['mean_accept_length']:.2f}  {t['speedup_vs_base']:.2f}x base greedy  "
              f"{t['tokens_per_second'] / hf_tps[domain]:.2f}x hf generate()  (base greedy "
              f"{b['tokens_per_second'] / hf_tps[domain]:.2f}x hf generate())")  # fmt: skip
    tps = {k: v["tokens_per_second"] for k, v in results.items()}
    mean_speedup = sum(per["tuned"]["speedup_vs_base"] for per in by_domain.values()) / max(1, len(by_domain))
    mean_accept = sum(per["tuned"]["mean_accept_length"] for per in by_domain.values()) / max(1, len(by_domain))
    print(f"\ntuned / base greedy:   {tps['tuned'] / tps['base_greedy']:.2f}x pooled, {mean_speedup:.2f}x averaged over "
          f"domains (goal >= 1.15x, >= 1.0x each); accepted length averaged over domains {mean_accept:.2f} (goal >= 1.6)")  # fmt: skip
    domains_hf = [per["tuned"]["tokens_per_second"] / hf_tps[d] for d, per in by_domain.items()]
    print(f"base greedy / hf generate(): {tps['base_greedy'] / hf_tps['all']:.2f}x (goal >= 2x); tuned / hf generate(): "
          f"{tps['tuned'] / hf_tps['all']:.2f}x pooled, {sum(domains_hf) / max(1, len(domains_hf)):.2f}x averaged over "
          "domains (goal >= 2.3x)")  # fmt: skip
    if "mc_sim_7b_63" in tps:
        print(f"tuned / mc_sim_7b_63:  {tps['tuned'] / tps['mc_sim_7b_63']:.2f}x   (goal >= 1.2x)")
    if not all(v["identical_to_greedy"] for v in results.values()):
        print("WARNING: some decoder's output differs from base greedy (run medusa-verify)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def generate_hf(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """transformers' eager greedy `generate()` on one prompt: (new tokens, seconds)."""
    import time

    x = torch.as_tensor(ids)[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.base.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=sorted(eos) or None, pad_token_id=model.base.config.pad_token_id)  # fmt: skip
    return out[0, len(ids) :].tolist(), time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
