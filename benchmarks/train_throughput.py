"""Head-training throughput vs a frozen base forward alone, on the same batches (CPU or GPU).

Prints tokens/s for: the base forward alone; a training step (base forward + heads + backward + AdamW); the same with
the teacher cache warm (base forward skipped), for shared_lm_head and per_head_lm_head, plus ratios side by side.

  python benchmarks/train_throughput.py --model smollm2-135m-instruct --batches 3 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import time

import torch

from medusa_toolkit.model.base_model import load_base_model
from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.train.losses import MedusaObjective


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    base, _ = load_base_model(args.model)
    vocab, hidden_size = base.get_output_embeddings().weight.shape
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    tokens = args.batches * args.batch * args.seq
    decoder = base.get_decoder()

    def timed(fn) -> float:
        fn(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            fn(b)
        return tokens / (time.perf_counter() - start)

    @torch.no_grad()
    def forward(b):
        return decoder(input_ids=b).last_hidden_state

    results = {"base forward": timed(forward)}
    cache = {id(b): forward(b) for b in batches}
    for head_type in ("shared_lm_head", "per_head_lm_head"):
        heads = MedusaHeads(hidden_size, vocab, args.num_heads, head_type=head_type)
        heads.init_from_lm_head(base.get_output_embeddings().weight)
        obj = MedusaObjective(heads, base.get_output_embeddings().weight)
        opt = torch.optim.AdamW([q for q in obj.parameters() if q.requires_grad], lr=1e-4)

        def step(b, cached=False, obj=obj, opt=opt):
            hidden = cache[id(b)] if cached else forward(b)
            loss, _ = obj(hidden, b, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()

        results[f"train {head_type}"] = timed(step)
        results[f"train {head_type} + teacher cache"] = timed(lambda b: step(b, cached=True))
    ref = results["base forward"]
    print(f"model={args.model} heads={args.num_heads} batch={args.batch}x{args.seq} threads={torch.get_num_threads()}")
    print(f"{'what':45s} {'tokens/s':>10s} {'time vs base fwd':>17s}")
    for name, tps in results.items():
        print(f"{name:45s} {tps:10.0f} {ref / tps:16.2f}x")


if __name__ == "__main__":
    main()
