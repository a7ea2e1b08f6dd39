"""What one Medusa step costs against a plain one-token step on this machine, for the trees a CPU can afford.

Times `generate.decode_step` (propose, the tree forward with its mask, acceptance, commit, the heads at the accepted
node) at a fixed KV length, exactly as the tree tuner does (`tree_timing.measure_step_times`), twice in one process:
with transformers' own `sdpa` (`plain`: grouped-query heads copied by `repeat_kv` under the tree mask) and with the
CPU variant decoding now uses (`medusa_toolkit.decoding.cpu_attention`). Then the commit alone: keeping the nodes of an
accepted chain (already in place: no K/V moves) against a branch that must move (one gather and scatter per layer).
Each step time is printed as a ratio to the plain one-token step (what a tree must beat: the base's greedy step).

  python benchmarks/bench_tree_step.py --heads runs/smollm2-135m/heads
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa_toolkit.decoding import generate
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning.timing import device_name

TREES = {
    "1 node": [],
    "chain-1": [[0]],
    "[[0],[1]]": [[0], [1]],
    "chain-2": [[0], [0, 0]],
    "chain-3": [[0], [0, 0], [0, 0, 0]],
}


def step_ms(model: MedusaModel, prefix: torch.Tensor, tree: MedusaTree, plain: bool, repeats: int) -> float:
    """Median ms of one decode_step over `tree` after a prefill of `prefix`, the cache cut back after each repeat."""
    with generate.use_attention(model, "sdpa", plain=plain) as attn:
        buffers = tree.buffers(model.device)
        start = generate.prefill(model, prefix, None, max(tree.depth, 1), generate.Greedy())
        lens = start.cache.lens.clone()
        samples = []
        for i in range(repeats + 3):
            state = generate.DecodeState(start.cache, start.roots, start.medusa_logits[: tree.depth])
            t0 = time.perf_counter()
            generate.decode_step(model, state, tree, buffers, attn, generate.Greedy())
            if i >= 3:
                samples.append(time.perf_counter() - t0)
            start.cache.set_lens(lens)
    return 1e3 * statistics.median(samples)


def commit_ms(model: MedusaModel, prefix: torch.Tensor, kept: list[int], repeats: int) -> float:
    """Median ms of committing `kept` nodes of the 4-node tree [[0], [1], [0, 0]] just verified (node i + 1 is its
    i-th path): node 1 right after the root is in place, node 2 must move."""
    tree = MedusaTree.from_paths([[0], [1], [0, 0]])
    with generate.use_attention(model, "sdpa") as attn:
        start = generate.prefill(model, prefix, None, tree.depth, generate.Greedy())
        state = generate.DecodeState(start.cache, start.roots, start.medusa_logits)
        lens = start.cache.lens.clone()
        tokens = generate.propose(state.roots, state.medusa_logits, tree, tree.buffers(model.device))
        generate.verify_tree(model, tokens, tree.buffers(model.device), start.cache, attn)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            start.cache.keep_nodes(torch.tensor([kept]), torch.tensor([len(kept)]))
            samples.append(time.perf_counter() - t0)
            start.cache.set_lens(lens)
    return 1e3 * statistics.median(samples)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--heads", default="runs/smollm2-135m/heads", help="a heads folder (the demo's by default)")
    ap.add_argument("--prefix", type=int, default=256, help="cached tokens before the step (the tuner's default)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model = MedusaModel.from_pretrained(args.base, args.heads)
    prefix = torch.randint(
        0, model.base.config.vocab_size, (1, args.prefix), generator=torch.Generator().manual_seed(0)
    )
    print(f"{device_name(model.device)}, float32, KV length {args.prefix}, median of {args.repeats} steps")
    times = {}
    for name, paths in TREES.items():
        tree = MedusaTree.from_paths(paths, name=name)
        times[name] = {p: step_ms(model, prefix, tree, p, args.repeats) for p in (True, False)}
    one = times["1 node"][True]
    print(f"{'tree':<11}{'nodes':>6}{'plain sdpa ms':>15}{'x 1 node':>10}{'cpu sdpa ms':>13}{'x 1 node':>10}")
    for name, t in times.items():
        nodes = len(TREES[name]) + 1
        print(f"{name:<11}{nodes:>6}{t[True]:>15.1f}{t[True] / one:>10.2f}{t[False]:>13.1f}{t[False] / one:>10.2f}")
    in_place, moved = commit_ms(model, prefix, [0, 1], args.repeats), commit_ms(model, prefix, [0, 2], args.repeats)
    print(f"commit of 2 nodes: root + node 1 (in place) {in_place:.2f} ms; root + node 2 (moved) {moved:.2f} ms")


if __name__ == "__main__":
    main()
