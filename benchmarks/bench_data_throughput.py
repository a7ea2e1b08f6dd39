"""Self-distillation throughput: response tokens/s of the data stage's generation path, levers side by side.

Same prompts (chitchat openers rendered with the chat template, at most --max-prompt-tokens, sorted by length as the
data stage sorts a shard), same model, one process, greedy, --new tokens per response, EOS honoured:

- `generate()`: transformers' generate, the data stage's path before (finished rows keep computing until the batch's
  longest row ends; the KV cache is concatenated every step);
- `decode loop`: `decoding.greedy_generate_batch`, the data stage's path now (Medusa's loop with the 1-node tree:
  keys written in place, finished rows leave the batch);

each at several batch sizes, and optionally in bfloat16 (`--dtypes float32,bfloat16`).

  python benchmarks/bench_data_throughput.py --prompts 128 --batches 32,64,128
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from medusa_toolkit import special_tokens
from medusa_toolkit.decoding.generate import greedy_generate_batch
from medusa_toolkit.model.base_model import has_bf16_matmul, load_base_model
from medusa_toolkit.prompts import load_prompts, render_prompt


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    return ids, mask


@torch.inference_mode()
def with_generate(model, ids, mask, new: int, pad: int, eos: list[int]) -> list[list[int]]:
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad, eos_token_id=eos
    )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if stop is None else row[: stop + 1])
    return rows


def run(path: str, model, prompts: list[list[int]], batch: int, new: int, pad: int, eos: list[int]):
    """(response tokens/s, the responses) of one path over all prompts at one batch size."""
    start, rows = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        ids, mask = padded(prompts[i : i + batch], pad)
        if path == "generate()":
            rows += with_generate(model, ids, mask, new, pad, eos)
        else:
            rows += greedy_generate_batch(model, ids, mask, new, eos)
    return sum(map(len, rows)) / (time.perf_counter() - start), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--new", type=int, default=96, help="max new tokens per response (the demo's data.max_new_tokens)")
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--batches", default="32,64,128")
    p.add_argument("--dtypes", default="float32")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{cpu_name()} ({torch.get_num_threads()} threads), bf16 matrix units: {has_bf16_matmul()}")
    print(f"{args.prompts} chitchat prompts (<= {args.max_prompt_tokens} tokens, sorted by length), <= {args.new} new")
    print(f"{'dtype':<10}{'path':<13}{'batch':>6}{'tokens/s':>10}{'x first':>9}  same tokens as the first row")
    first = None
    for dtype in args.dtypes.split(","):
        model, tok = load_base_model(args.model, dtype, "cpu")
        pad, eos = special_tokens.pad_token_id(model, tok), special_tokens.eos_ids(model)
        ids = [render_prompt(tok, t) for t in load_prompts("chitchat")]
        ids = sorted([i for i in ids if len(i) <= args.max_prompt_tokens][: args.prompts], key=len)
        run("decode loop", model, ids[:4], 4, 4, pad, eos)  # warm-up
        for path in ("generate()", "decode loop"):
            for batch in batches:
                tps, rows = run(path, model, ids, batch, args.new, pad, eos)
                if first is None:
                    first = (tps, rows)
                same = sum(a == b for a, b in zip(rows, first[1]))
                print(
                    f"{dtype:<10}{path:<13}{batch:>6}{tps:>10.1f}{tps / first[0]:>9.2f}  {same}/{len(rows)}", flush=True
                )


if __name__ == "__main__":
    main()
