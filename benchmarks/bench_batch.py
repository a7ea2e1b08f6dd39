"""Tokens/s vs batch size: base greedy (HF generate, batched, left padding) vs batched Medusa greedy.

Medusa trades extra FLOPs (a tree of N tokens per row per step) for fewer sequential steps. At batch 1 decoding is
memory/latency bound and the extra tokens are nearly free; as the batch grows the forward becomes compute bound and
the tree's extra tokens start to cost as much as they save. This script finds the batch size where that happens on
this machine: the first B where Medusa's tokens/s falls below base greedy's.

    python benchmarks/bench_batch.py --tiny                       # tiny Llama + quickly fitted heads (offline, ~1 min)
    python benchmarks/bench_batch.py --heads DIR [--tree T]       # SmolLM2-135M-Instruct with trained heads
    python benchmarks/bench_batch.py --fresh-heads                # untrained heads: checks the script, not the speed

Both sides generate exactly --max-new-tokens per row (EOS ignored). One warm-up, then the median of --repeats runs.
Writes a PNG plot next to --json (or bench_batch.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = torch.tensor(r), 1
    return ids, mask


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(args):
    from medusa_toolkit import MedusaHeads, MedusaModel, load_base_model

    if args.tiny:
        from medusa_toolkit.testing.heads import fit_heads, greedy_corpus
        from medusa_toolkit.testing.tiny import tiny_base

        base = tiny_base("llama", seed=1)
        model = MedusaModel(base, fit_heads(base, num_heads=4, steps=150, seed=1))
        corpus = greedy_corpus(base, seed=1)  # the heads' training text: every prompt gets the same kind of acceptance
        rows = [corpus[i % len(corpus), : 4 + (i * 7) % 24].tolist() for i in range(max(args.batch_sizes))]
        return model, rows, "tiny llama (fitted heads)"
    from medusa_toolkit.prompts import load_prompts, render_prompt

    base, tok = load_base_model(args.base, attn_implementation="sdpa")
    if args.fresh_heads:
        heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4)
        heads.init_from_lm_head(base.get_output_embeddings().weight)
        name = f"{args.base} (fresh heads)"
    elif args.heads:
        heads, name = MedusaHeads.from_pretrained(args.heads), f"{args.base} + {args.heads}"
    else:
        sys.exit("pass --heads DIR, --fresh-heads or --tiny")
    texts = load_prompts("chitchat", split="heldout", num=max(args.batch_sizes))
    return MedusaModel(base, heads, tok), [render_prompt(tok, t)[-256:] for t in texts], name


def main(argv: list[str] | None = None) -> int:
    from medusa_toolkit.config import ATTN_IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--heads", default=None)
    p.add_argument("--fresh-heads", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tree", default=None, help="tree preset or tree.json (default: chain over all heads)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attn", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from medusa_toolkit.decoding.generate import medusa_generate_batch

    model, prompts, name = load(args)
    new = args.max_new_tokens
    results = []
    for b in args.batch_sizes:
        ids, mask = left_pad(prompts[:b], pad_id=0)
        ids, mask = ids.to(model.device), mask.to(model.device)

        def base_run(ids=ids, mask=mask):
            return model.base.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
            )

        out = {}

        def medusa_run(ids=ids, mask=mask, out=out):
            out["r"] = medusa_generate_batch(model, ids, mask, new, tree=args.tree, eos_token_id=[],
                                             attn_implementation=args.attn)  # fmt: skip

        t_base, t_medusa = timed(base_run, args.repeats), timed(medusa_run, args.repeats)
        ref = base_run()[:, ids.shape[1] :]
        same = sum(torch.equal(row[-new:], ref[i]) for i, row in enumerate(out["r"].rows()))
        row = {"batch": b, "base_tok_s": b * new / t_base, "medusa_tok_s": b * new / t_medusa,
               "mean_accept": out["r"].mean_accept_length, "rows_equal_to_hf_batched": f"{same}/{b}"}  # fmt: skip
        row["speedup"] = row["medusa_tok_s"] / row["base_tok_s"]
        results.append(row)
        print(
            f"B={b:3d}  base {row['base_tok_s']:8.1f} tok/s  medusa {row['medusa_tok_s']:8.1f} tok/s  "
            f"x{row['speedup']:.2f}  accept/step {row['mean_accept']:.2f}  rows==HF {same}/{b}",
            flush=True,
        )
    stop = next((r["batch"] for r in results if r["speedup"] < 1.0), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    verdict = (
        f"Medusa stops paying off at batch {stop}" if stop else f"Medusa pays off up to batch {max(args.batch_sizes)}"
    )
    print(f"{name}, {device}, tree {args.tree or 'chain'}: {verdict}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = [r["batch"] for r in results]
    ax.plot(bs, [r["base_tok_s"] for r in results], "o-", label="base greedy (HF generate)")
    ax.plot(bs, [r["medusa_tok_s"] for r in results], "s-", label="Medusa (batched)")
    ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s", title=f"{name}\n{device}")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.legend()
    fig.tight_layout()
    png = Path(args.json).with_suffix(".png") if args.json else Path("bench_batch.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "device": device, "stop_batch": stop,
                                               "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
