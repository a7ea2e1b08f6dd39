"""Per-epoch speed-up of the teacher cache (`train.teacher_cache`: false, memory, disk), measured side by side.

Trains SmolLM2 heads for 3 epochs on a small synthetic data artefact (random token ids: the timing does not depend on
what the tokens say) once per cache mode; then `disk` and `memory` once more each, interrupted right after the
checkpoint at the end of epoch 1 and continued with --resume (a new trainer in this process: `disk` reopens the cache
the first one wrote, `memory` starts empty, so its epoch 2 goes through the base again). Prints each epoch's train
time (training steps only: no evals, no checkpoint writing), epoch 1 / mean of epochs 2+, each epoch against the
uncached run's, and the cache's size on disk.

  python benchmarks/teacher_cache.py                      # 16 sequences x 96 tokens, micro batch 4, 3 epochs
  python benchmarks/teacher_cache.py --sequences 32 --seq 128 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.model.base_model import load_base_model
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.train import trainer


def write_data(run_dir: Path, vocab: int, sequences: int, heldout: int, seq: int, prompt: int) -> None:
    """A data artefact of random token ids (`prompt` untrained tokens, then `seq - prompt` trained ones)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    total = sequences + heldout
    ids = torch.randint(100, vocab, (total, seq), generator=g).tolist()  # clear of the special tokens
    rows = {"input_ids": ids, "loss_mask": [[0] * prompt + [1] * (seq - prompt)] * total,
            "prompt_length": [prompt] * total, "heldout": [i >= sequences for i in range(total)]}  # fmt: skip
    datasets.Dataset.from_dict(rows).save_to_disk(str(run_dir / "data"))


def train_run(root: Path, name: str, data: Path, args, cache, interrupt_at: int | None = None) -> dict:
    """One training run in root/name on the shared data; with `interrupt_at`, Ctrl-C right after that step's
    checkpoint, then the same config with resume. Returns training_summary.json."""
    run = root / name
    run.mkdir()
    os.symlink(data, run / "data")
    steps_per_epoch = args.sequences // args.micro
    train = {"micro_batch_size": args.micro, "max_seq_len": args.seq, "epochs": float(args.epochs),
             "teacher_cache": cache, "eval_every": 10**6, "log_every": steps_per_epoch,
             "checkpoint_every": interrupt_at or 10**6, "warmup_ratio": 0.0}  # fmt: skip
    raw = {"model": {"name_or_path": args.model}, "heads": {"num_heads": args.num_heads, "head_type": args.head_type},
           "train": train, "logging": {"wandb_mode": "disabled", "progress": False}}  # fmt: skip
    out = run / "heads"
    out.mkdir()
    if interrupt_at is not None:
        real = trainer.save_checkpoint

        def save_then_interrupt(engine, run_dir, progress, *rest):
            real(engine, run_dir, progress, *rest)
            if progress.step == interrupt_at:
                raise KeyboardInterrupt  # what a user killing the run leaves: the checkpoint, and the disk cache

        trainer.save_checkpoint = save_then_interrupt
        try:
            trainer.train(StageRun.prepare(config_from_dict(raw), run, "train", out))
            raise AssertionError("the run was meant to be interrupted")
        except KeyboardInterrupt:
            pass
        finally:
            trainer.save_checkpoint = real
        raw["train"]["resume"] = True
    trainer.train(StageRun.prepare(config_from_dict(raw), run, "train", out))
    return json.loads((out / trainer.SUMMARY).read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--head-type", default="shared_lm_head")
    p.add_argument("--sequences", type=int, default=16, help="training sequences (one epoch)")
    p.add_argument("--heldout", type=int, default=2)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    base, _ = load_base_model(args.model)  # converted once; the runs below load it again, as medusa-train does
    vocab, hidden = base.get_output_embeddings().weight.shape
    del base
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        root = Path(tmp)
        write_data(root / "data-run", vocab, args.sequences, args.heldout, args.seq, prompt=16)
        data = root / "data-run" / "data"
        one_epoch = args.sequences // args.micro
        runs = {
            "false": train_run(root, "false", data, args, False),
            "memory": train_run(root, "memory", data, args, "memory"),
            "disk": train_run(root, "disk", data, args, "disk"),
            "disk, resumed after epoch 1": train_run(root, "disk-resume", data, args, "disk", one_epoch),
            "memory, resumed after epoch 1": train_run(root, "memory-resume", data, args, "memory", one_epoch),
        }
        size = sum(f.stat().st_size for f in (root / "disk" / "teacher_cache").iterdir())
    print(f"model={args.model} heads={args.num_heads} {args.head_type} train={args.sequences}x{args.seq} tokens "
          f"(+{args.heldout} held out) micro={args.micro} epochs={args.epochs} threads={torch.get_num_threads()}")  # fmt: skip
    ref = runs["false"]["epoch_train_time_s"]
    cols = "".join(f"{f'epoch {e + 1} s':>10s}" for e in range(args.epochs))
    cols += "".join(f"{f'x{e + 1}':>7s}" for e in range(args.epochs))
    print(f"{'teacher_cache':32s}{cols}{'ep1/ep2+':>10s}{'base/cached batches':>21s}")
    for name, summary in runs.items():
        times = summary["epoch_train_time_s"]
        later = sum(times[1:]) / max(1, len(times) - 1)
        speedups = "".join(f"{r / t:6.2f}x" for r, t in zip(ref, times))  # vs the uncached run's same epoch
        report = summary.get("teacher_cache", {})
        batches = f"{report.get('batches_through_base', '-')}/{report.get('batches_from_cache', '-')}"
        print(f"{name:32s}{''.join(f'{t:10.1f}' for t in times)}{speedups}{times[0] / later:9.2f}x{batches:>21s}")
    print(
        f"disk cache: {size / 2**20:.1f} MiB for {args.sequences + args.heldout} sequences x {args.seq} tokens x "
        f"hidden {hidden} (float32: {(args.sequences + args.heldout) * args.seq * hidden * 4 / 2**20:.1f} MiB)"
    )
    print("base/cached batches: batches of the last process only (a resumed run counts from its resume)")


if __name__ == "__main__":
    main()
