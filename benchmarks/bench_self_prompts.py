"""Self-written prompts (data source `self`): seconds per prompt of the in-process writer, levers side by side.

Same model, same sampling (temperature 1.0, top-p 0.95, `--max-tokens` per prompt), one process, the writers named by
`--writers` (all four by default), `--prompts` prompts each:
  generate()        what the data stage did before: transformers' generate() on a batch of the shared prefix
                    (a full-vocabulary sort and multinomial per token; finished rows computed until the last ends)
  sample_turns/32   the data stage's own loop (medusa_toolkit.train.data.self_prompts.sample_turns): the prefix runs once,
                    finished rows leave the batch, top-p decided among the 1024 likeliest tokens
  sample_turns/64   the same at twice the batch (the data stage writes at 2 x data.batch_size)
  sample_turns/128  the same at 128 rows (the demo's data.batch_size is 64)
Prints seconds per prompt, how many ended their turn (the rest are dropped as unfinished) and their mean length, so the
writers are seen to sample alike, and each writer's speed-up over generate().

  python benchmarks/bench_self_prompts.py --prompts 128
"""

from __future__ import annotations

import argparse
import time

import torch

from medusa_toolkit import special_tokens
from medusa_toolkit.model.base_model import load_base_model
from medusa_toolkit.train.data import self_prompts
from medusa_toolkit.tuning.timing import device_name


def with_generate(model, prefix, rows, max_tokens, eos, pad, seed) -> list[tuple[list[int], bool]]:
    """The previous writer: generate() over `rows` copies of the prefix, seeded globally."""
    torch.manual_seed(seed)
    ids = torch.tensor([prefix] * rows)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                         top_p=0.95, top_k=None, max_new_tokens=max_tokens, eos_token_id=list(eos),
                         pad_token_id=pad)  # fmt: skip
    turns = []
    for row in out[:, len(prefix) :].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        turns.append((row if stop is None else row[:stop], stop is not None))
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=128, help="prompts per writer (a multiple of 128)")
    ap.add_argument("--max-tokens", type=int, default=96, help="the demo's data.sources[self].max_tokens")
    ap.add_argument("--writers", default="generate(),sample_turns/32,sample_turns/64,sample_turns/128")
    args = ap.parse_args()
    model, tok = load_base_model(args.base, dtype="float32")
    eos, pad = set(special_tokens.eos_ids(model)), special_tokens.pad_token_id(model, tok)
    prefix = self_prompts.pre_query_ids(tok, None)
    writers = {
        "generate()": (32, lambda r, n: with_generate(model, prefix, n, args.max_tokens, eos, pad, r)),
        "sample_turns/32": (
            32,
            lambda r, n: self_prompts.sample_turns(model, prefix, n, args.max_tokens, 1.0, 0.95, eos, r),
        ),
        "sample_turns/64": (
            64,
            lambda r, n: self_prompts.sample_turns(model, prefix, n, args.max_tokens, 1.0, 0.95, eos, r),
        ),
        "sample_turns/128": (
            128,
            lambda r, n: self_prompts.sample_turns(model, prefix, n, args.max_tokens, 1.0, 0.95, eos, r),
        ),
    }
    writers = {name: writers[name] for name in args.writers.split(",")}
    print(f"{device_name(model.device)}, float32, {args.prompts} prompts per writer, <= {args.max_tokens} tokens each")
    first = None
    for name, (batch, write) in writers.items():
        write(10**6, 2)  # warm-up
        start, turns = time.perf_counter(), []
        for r in range(args.prompts // batch):
            turns += write(r, batch)
        per_prompt = (time.perf_counter() - start) / len(turns)
        first = first or per_prompt
        ended = [len(t) for t, done in turns if done]
        print(
            f"{name:<16} {1e3 * per_prompt:6.0f} ms/prompt   ended {len(ended)}/{len(turns)}, mean "
            f"{sum(ended) / max(1, len(ended)):.1f} tokens   {first / per_prompt:.2f}x"
        )


if __name__ == "__main__":
    with torch.inference_mode():
        main()
