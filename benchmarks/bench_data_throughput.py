"""Self-distillation throughput: response tokens/s of the data stage's generation path, levers side by side.

Same prompts, same model, one process: float32 vs bfloat16 (what `data.generation_dtype: auto` picks where the CPU has
bf16 matrix units), batch 16 vs 64, prompts in source order vs sorted by length (what the data stage does within a
shard). Greedy, `--new` tokens per response, EOS honoured (finished rows still occupy their batch slot in generate()).

  python benchmarks/bench_data_throughput.py --prompts 64 --new 64
"""

from __future__ import annotations

import argparse
import time

import torch

from medusa_toolkit.base_model import has_bf16_matmul, load_base_model
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.prompts import load_prompts, render_prompt
from medusa_toolkit.special_tokens import pad_token_id
from medusa_toolkit.train.data import generate_batch


def run(model, tok, prompts: list[list[int]], batch: int, new: int, sort: bool) -> float:
    cfg = config_from_dict({"data": {"max_new_tokens": new, "batch_size": batch}})
    order = sorted(prompts, key=len) if sort else prompts
    pad = pad_token_id(model, tok)
    generate_batch(model, tok, order[:2], cfg, pad)  # warm-up
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(order), batch):
        tokens += sum(len(r) for r in generate_batch(model, tok, order[i : i + batch], cfg, pad))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    texts = load_prompts("chitchat", num=args.prompts)
    print(f"threads={torch.get_num_threads()} bf16 matmul units: {has_bf16_matmul()}")
    print(f"{'dtype':<10}{'batch':>6}{'sorted':>8}{'tokens/s':>10}{'x fp32 b16':>12}")
    base_tps = None
    for dtype in ("float32", "bfloat16"):
        model, tok = load_base_model(args.model, dtype, "cpu")
        ids = [render_prompt(tok, t) for t in texts]
        for batch, sort in ((16, False), (16, True), (64, True)):
            tps = run(model, tok, ids, batch, args.new, sort)
            base_tps = base_tps or tps
            print(f"{dtype:<10}{batch:>6}{sort!s:>8}{tps:>10.1f}{tps / base_tps:>12.2f}")


if __name__ == "__main__":
    main()
