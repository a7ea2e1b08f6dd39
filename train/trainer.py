"""Stage `train`: Medusa heads on a frozen base model, trained with a DeepSpeed engine — the recipe, read top to bottom.

The base runs frozen (eval, no grad) to give the last hidden states (train.teacher: optionally cached); only the
heads (wrapped with the loss in `MedusaObjective`) go into the engine. The data order is a pure function of (seed,
step), so a resumed run sees exactly the batches an uninterrupted one would: checkpoints (train.checkpoints) hold the
DeepSpeed state (heads, optimizer, scheduler), the step and every rank's RNG state.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medusa_toolkit import distributed as D
from medusa_toolkit import special_tokens
from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.model.base_model import load_base_model
from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.medusa_model import BaseHead
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.train.checkpoints import (
    Progress,
    check_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_run_info,
)
from medusa_toolkit.train.data.stage import frequent_targets, load_data
from medusa_toolkit.train.losses import MedusaObjective, target_counts
from medusa_toolkit.train.teacher import Teacher, make_teacher

SUMMARY = "training_summary.json"


class TrainError(ToolkitError, ValueError):
    """Training cannot start (bad DeepSpeed file, incompatible checkpoint, ...); the message says what to do."""


def deepspeed_config(cfg: ToolkitConfig) -> dict:
    """The DeepSpeed config: train.deepspeed.config_file (if any) wins; our fields fill what it leaves out."""
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.deepspeed.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # our optimizer is torch.optim.AdamW (no op build needed)
        "steps_per_print": 10**9,
    }
    if not t.deepspeed.config_file:
        return ours
    path = Path(t.deepspeed.config_file)
    if not path.is_file():
        raise TrainError(f"train.deepspeed.config_file not found: {path}")
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(theirs, dict):
        raise TrainError(f"{path}: a DeepSpeed config must be a JSON object")
    if "train_batch_size" in theirs:  # it fixes the global batch; drop ours so DeepSpeed derives what it leaves out
        ours.pop("gradient_accumulation_steps")
    return {**ours, **{k: v for k, v in theirs.items() if v != "auto"}}


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup then cosine decay to min_lr_ratio, as a LambdaLR factor of the step."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def data_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count of the endless stream of seeded per-epoch permutations of range(n)."""
    out, epoch = [], start // n
    pos = start - epoch * n
    while len(out) < count:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.extend(perm[pos:])
        pos, epoch = 0, epoch + 1
    return out[:count]


def collate(rows: list[dict], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Right-pad (causal: padding after a sequence never changes its hidden states) into input ids, targets (each
    position's `labels`: the token the base emits there; artefacts without the column: the input ids themselves) and
    the loss mask (padding masked); and the real lengths."""
    width = min(max_len, max(len(r["input_ids"]) for r in rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x = r["input_ids"][:width]
        ids[i, : len(x)] = torch.tensor(x)
        targets[i, : len(x)] = torch.tensor((r.get("labels") or r["input_ids"])[:width])
        mask[i, : len(x)] = torch.tensor(r["loss_mask"][:width])
    return ids.to(device), targets.to(device), mask.to(device), [min(len(r["input_ids"]), width) for r in rows]


def build_heads(cfg: ToolkitConfig, base, lm_head_weight: torch.Tensor, train_ds) -> MedusaHeads:
    """New heads initialised from the base's (full, gathered) lm_head weight, or heads.init_from's heads; with
    heads.truncated_vocab_size, scoring the tokens the base emits most often in the training data."""
    h = cfg.heads
    if h.init_from:
        heads = MedusaHeads.from_pretrained(h.init_from)
        heads.check_compatible(base)  # reads ds_shape under ZeRO-3
        if h.truncated_vocab_size not in (None, heads.config.truncated_vocab_size):
            raise TrainError(
                f"heads.init_from {h.init_from} has truncated_vocab_size={heads.config.truncated_vocab_size}, the "
                f"config asks for {h.truncated_vocab_size}; set heads.truncated_vocab_size to null or to theirs"
            )
        mine = {"num_heads": h.num_heads, "num_layers": h.num_layers, "head_type": h.head_type}
        theirs = {"num_heads": heads.num_heads, "num_layers": heads.num_layers, "head_type": heads.head_type}
        conflicts = [f"heads.{k} is {mine[k]!r}, {h.init_from} has {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        if conflicts:  # checked before any work for a local folder (pipeline.check_inputs); here for a Hub id
            raise TrainError(f"heads.init_from does not match the heads configured: {'; '.join(conflicts)}")
        heads.config.base_model_name_or_path = cfg.model.name_or_path  # trained on this base now, whatever they were
        return heads
    vocab, hidden = lm_head_weight.shape
    token_map = None
    if h.truncated_vocab_size and h.truncated_vocab_size < vocab:
        token_map, _ = frequent_targets(train_ds, h.truncated_vocab_size, special_tokens.eos_ids(base))
    heads = MedusaHeads(hidden, vocab, h.num_heads, h.num_layers, h.head_type, cfg.model.name_or_path, token_map)
    heads.init_from_lm_head(lm_head_weight)
    return heads.float()


def _gathered(engine):
    """Context with the (possibly ZeRO-3 partitioned) heads parameters gathered on every rank."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _wandb(cfg: ToolkitConfig, run_dir: Path, digest: str):
    mode = cfg.logging.wandb_mode
    if not D.is_main() or mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    run = wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.run_name or f"medusa-{digest}",
        mode=mode,
        dir=str(run_dir),
        config=cfg.to_dict(),
        reinit="finish_previous",
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _metrics(stats: torch.Tensor, prefix: str) -> dict[str, float]:
    """Per-head loss / top1 / top5 from summed stats [num_heads, 4]."""
    out = {}
    for k, (loss, n, c1, c5) in enumerate(stats.tolist()):
        n = max(n, 1)
        out.update(
            {f"{prefix}/head{k}/loss": loss / n, f"{prefix}/head{k}/top1": c1 / n, f"{prefix}/head{k}/top5": c5 / n}
        )
    return out


@torch.no_grad()
def evaluate(engine, teacher: Teacher, ds, offset: int, micro: int, max_len: int, device) -> torch.Tensor:
    """Summed stats over the held-out set (each rank its share, summed over ranks)."""
    engine.eval()
    n_batches = math.ceil(len(ds) / micro)
    rounds = math.ceil(n_batches / D.world_size())
    stats = None
    for r in range(rounds):
        b = r * D.world_size() + D.rank()
        idx = list(range(b * micro, min((b + 1) * micro, len(ds)))) or [0]  # same call count on every rank (ZeRO-3)
        ids, targets, mask, lengths = collate([ds[i] for i in idx], max_len, device)
        if b >= n_batches:
            mask = torch.zeros_like(mask)
        hidden = teacher([offset + i for i in idx], ids, lengths)
        _, s = engine(hidden, targets, mask)
        stats = s if stats is None else stats + s
    engine.train()
    return D.all_reduce_sum(stats)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe: setup, step, log + evaluate, checkpoint, save


@dataclass
class Setup:
    """Everything a training run holds, built once by `setup`."""

    engine: Any
    heads: MedusaHeads
    teacher: Teacher
    train_ds: Any
    eval_ds: Any
    device: torch.device
    micro: int
    accum: int
    global_batch: int
    total_steps: int
    config_hash: str
    counts: dict[int, torch.Tensor] = field(default_factory=dict)  # per sequence: each head's target count
    zero3_base: Any = None  # ZeRO-3: (HfDeepSpeedConfig, base engine), kept alive for the whole stage

    def step_counts(self, order: list[int], max_len: int) -> torch.Tensor:
        """Each head's target count over these training sequences [num_heads]."""
        total = torch.zeros(self.heads.num_heads, dtype=torch.float64)
        for i in order:
            if i not in self.counts:
                self.counts[i] = target_counts([self.train_ds[i]["loss_mask"]], self.heads.num_heads, max_len)
            total += self.counts[i]
        return total


def setup(run: StageRun) -> Setup:
    """Data, frozen base, heads + loss, optimizer and schedule, DeepSpeed engine."""
    import deepspeed

    cfg, run_dir = run.cfg, run.dirs.root
    t = cfg.train
    digest = run.digest[:16]  # a checkpoint of other inputs is never resumed
    ds_config = deepspeed_config(cfg)  # before loading anything: a bad file fails fast
    check_checkpoints(run.dirs.checkpoints, digest, run.inputs["sections"], t.resume, run.force)
    train_ds, eval_ds = load_data(run_dir)
    if len(train_ds) == 0:
        raise TrainError(f"the data artefact in {run_dir / 'data'} has no training sequences; raise data.num_prompts")
    device = D.device() if cfg.model.device is None else torch.device(cfg.model.device)
    micro, accum = batch_geometry(ds_config, D.world_size())
    base, base_head, zero3_base = load_frozen_base(cfg, ds_config, device)
    torch.manual_seed(t.seed)
    heads = build_heads(cfg, base, base_head.weight, train_ds)
    objective = MedusaObjective(heads, base_head, t.loss, t.head_weight_decay, t.kl_temperature, t.kl_top_k)

    global_batch = micro * accum * D.world_size()
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(train_ds) / global_batch))
    groups = param_groups(objective)
    schedule = lr_lambda(total_steps, t.warmup_ratio, t.min_lr_ratio)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = None
    if "scheduler" not in ds_config:
        # Our warmup + cosine, also on an optimizer the JSON defines (DeepSpeed calls this with the optimizer it
        # built): without it a JSON `optimizer` alone would silently train at a constant learning rate.
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    engine, *_ = deepspeed.initialize(
        model=objective, model_parameters=groups, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) != (micro, accum):
        raise TrainError(
            f"DeepSpeed resolved micro batch {engine.train_micro_batch_size_per_gpu()} x accumulation "
            f"{engine.gradient_accumulation_steps()}, the data order expects {micro} x {accum}; set both in the JSON"
        )
    return Setup(
        engine, heads, make_teacher(run, base, train_ds, eval_ds), train_ds, eval_ds, device, micro,
        accum, global_batch, total_steps, digest, zero3_base=zero3_base,
    )  # fmt: skip


def load_frozen_base(cfg: ToolkitConfig, ds_config: dict, device) -> tuple[Any, BaseHead, Any]:
    """The frozen base, its `BaseHead` (a private full copy of lm_head for the loss), and under ZeRO-3 the objects
    that keep it partitioned (else None).

    ZeRO-3: the base is loaded partitioned across ranks at from_pretrained (transformers partitions under zero.Init
    while an `HfDeepSpeedConfig` is alive; it holds only a weak reference, so we keep it until the stage ends) and
    wrapped in a DeepSpeed engine without optimizer that gathers each layer's parameters for its forward, as TRL does
    for reference models. Per-rank memory for the base is ~1/world. The partition dtype follows the DeepSpeed config's
    bf16/fp16 section, so it is set from model.dtype here (not from train.precision, which is the heads').
    """
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        base, _ = load_base_model(cfg.model.name_or_path, cfg.model.dtype, device)
        return base, BaseHead.of(base, frozen_copy=True), None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    dtype = str(cfg.model.dtype).removeprefix("torch.")
    base_ds = {
        # deepspeed.initialize requires a batch size even without an optimizer
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "zero_optimization": {k: v for k, v in zero.items() if k not in ("offload_optimizer",)},
        "bf16": {"enabled": dtype in ("bfloat16", "bf16")},
        "fp16": {"enabled": dtype in ("float16", "fp16", "half")},
        "steps_per_print": 10**9,
    }
    keep = HfDeepSpeedConfig(base_ds)  # alive while from_pretrained runs, and after (see Setup.zero3_base)
    base, _ = load_base_model(cfg.model.name_or_path, cfg.model.dtype, device)
    base_engine, *_ = deepspeed.initialize(model=base, config=base_ds)
    base_engine.eval()
    lm_head = base.get_output_embeddings()
    gather = [lm_head.weight] + ([lm_head.bias] if getattr(lm_head, "bias", None) is not None else [])
    with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
        base_head = BaseHead.of(base, frozen_copy=True)  # the loss's frozen projection and the heads' init
    return base, base_head, (keep, base_engine)


def end_zero3_base(s: Setup) -> None:
    """Drop the ZeRO-3 base's DeepSpeed config: later from_pretrained calls in this process load unpartitioned."""
    if s.zero3_base is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        s.zero3_base = None


def batch_geometry(ds_config: dict, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) of the merged DeepSpeed config, written back into it explicitly so
    DeepSpeed and our data order use the same numbers (a JSON setting only the micro batch must not leave our
    micro batch sizing the step while DeepSpeed slices it with its own)."""
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    if "train_batch_size" in ds_config:
        total = int(ds_config["train_batch_size"])
        accum = int(ds_config.get("gradient_accumulation_steps") or max(1, total // (micro * world)))
        if micro * accum * world != total:
            raise TrainError(
                f"DeepSpeed train_batch_size {total} != micro batch {micro} x accumulation {accum} x {world} ranks; "
                "fix train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps in the JSON"
            )
    else:
        accum = int(ds_config.get("gradient_accumulation_steps", 1))
    ds_config.update(
        train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=micro * accum * world
    )
    return micro, accum


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Trainable parameters in two groups: matrices (weight decay) and biases / 1-D tensors (never decayed)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def train_step(s: Setup, cfg: ToolkitConfig, progress: Progress) -> None:
    """One optimizer step: `accum` micro batches per rank, at the data position the step number fixes."""
    start = time.perf_counter()
    world, rank, micro = D.world_size(), D.rank(), s.micro
    order = data_order(len(s.train_ds), cfg.train.seed, progress.step * s.global_batch, s.global_batch)
    # Every target token of the step weighs the same: each head's loss is summed and divided by the step's target
    # count over all micro-batches and ranks (every rank knows the whole step's order, so no collective is needed).
    # DeepSpeed divides by the accumulation steps (backward) and averages over ranks (gradient reduce): undo both.
    norm = s.step_counts(order, cfg.train.max_seq_len)
    scale = s.accum * world
    stats, tokens = None, 0
    for m in range(s.accum):
        chunk = order[(m * world + rank) * micro : (m * world + rank + 1) * micro]
        ids, targets, mask, lengths = collate([s.train_ds[i] for i in chunk], cfg.train.max_seq_len, s.device)
        hidden = s.teacher(chunk, ids, lengths)
        loss, micro_stats = s.engine(hidden, targets, mask, norm)
        s.engine.backward(loss * scale)
        s.engine.step()
        stats = micro_stats if stats is None else stats + micro_stats
        tokens += sum(lengths)
    # Every rank decides together (a rank stopping alone would hang the others at the next collective).
    if not D.all_true(bool(torch.isfinite(stats).all())):
        lr = s.engine.get_lr()[0]
        raise TrainError(
            f"training diverged at step {progress.step + 1}: a head's loss is nan or inf (learning rate {lr:.3g}); "
            "lower train.learning_rate (or raise train.warmup_ratio) and rerun; no heads were written"
        )
    progress.step += 1
    seconds = time.perf_counter() - start
    epoch = (progress.step - 1) * s.global_batch // len(s.train_ds)
    progress.epoch_time_s.extend([0.0] * (epoch + 1 - len(progress.epoch_time_s)))
    progress.epoch_time_s[epoch] += seconds
    progress.add(stats, tokens, seconds)


def log_and_evaluate(s: Setup, cfg: ToolkitConfig, progress: Progress, wandb_run, bar) -> None:
    """At a log step: the window's per-head metrics (and held-out ones at an eval step) into the history."""
    t, done = cfg.train, progress.step
    progress.sync()
    progress.train_metrics = _metrics(torch.tensor(progress.window, dtype=torch.float64), "train")
    tok_s = progress.window_tokens / max(progress.window_time_s, 1e-9)
    row = {"step": done, "tokens": progress.tokens, "tokens_per_s": tok_s, "lr": s.engine.get_lr()[0],
           **progress.train_metrics}  # fmt: skip
    if (done % t.eval_every == 0 or done == s.total_steps) and len(s.eval_ds):
        stats = evaluate(s.engine, s.teacher, s.eval_ds, len(s.train_ds), s.micro, t.max_seq_len, s.device)
        progress.eval_metrics = _metrics(stats, "eval")
        row.update(progress.eval_metrics)
    progress.history.append(row)
    if wandb_run is not None:
        wandb_run.log(row)
    bar.set_postfix(loss=f"{progress.train_metrics['train/head0/loss']:.3f}",
                    acc0=f"{progress.train_metrics['train/head0/top1']:.2f}", tok_s=f"{tok_s:.0f}", refresh=False)  # fmt: skip
    progress.window, progress.window_tokens, progress.window_time_s = None, 0, 0.0


def save_heads(
    s: Setup, cfg: ToolkitConfig, progress: Progress, out_dir: Path | None, start_time: float
) -> MedusaHeads:
    """The trained heads (gathered under ZeRO-3) as float32; rank 0 writes them with the summary, metrics and plot."""
    teacher_report = s.teacher.report()
    with _gathered(s.engine):
        final = MedusaHeads(**_heads_args(s.heads))
        final.load_state_dict({k: v.detach().float().cpu() for k, v in s.heads.state_dict().items()})
    bad = final.nonfinite()
    if bad:
        raise TrainError(f"the trained heads hold nan or inf ({', '.join(bad[:3])}); lower train.learning_rate and "
                         "rerun; they were not written")  # fmt: skip
    if D.is_main() and out_dir is not None:
        final.save_pretrained(out_dir)
        summary = {
            "steps": s.total_steps,
            "tokens": progress.tokens,
            "target_tokens": progress.target_tokens,
            "train_sequences": len(s.train_ds),
            "heldout_sequences": len(s.eval_ds),
            "world_size": D.world_size(),
            "global_batch": s.global_batch,
            "loss": cfg.train.loss,
            "head_type": s.heads.head_type,
            "num_heads": s.heads.num_heads,
            "final_train": _per_head(progress.train_metrics, "train"),
            "final_heldout": _per_head(progress.eval_metrics, "eval"),
            "tokens_per_s": progress.tokens / max(progress.train_time_s, 1e-9),
            "train_time_s": progress.train_time_s,
            "wall_time_s_this_run": time.time() - start_time,
            "config_hash": s.config_hash,
            "epoch_train_time_s": progress.epoch_time_s,
        }
        if final.token_map is not None:
            _, coverage = frequent_targets(s.train_ds, 0, final.token_map.tolist())
            summary["truncated_vocab"] = {"size": len(final.token_map), "train_targets_covered": coverage}
        if cfg.train.teacher_cache:
            summary["teacher_cache"] = {"mode": cfg.train.teacher_cache, **teacher_report}
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in progress.history))
        _plot(progress.history, s.heads.num_heads, out_dir / "accuracy.png")
        acc = ", ".join(f"{a:.2f}" for a in summary["final_heldout"].get("top1", []))
        print(
            f"[train] {s.total_steps} steps, {progress.tokens} tokens ({summary['tokens_per_s']:.0f} tokens/s); "
            f"held-out top-1 per head: {acc}"
        )
    return final


def train(run: StageRun) -> MedusaHeads:
    """Train the heads; rank 0 writes them into run.out. Read top to bottom: setup, resume, steps, save."""
    D.init_distributed()
    cfg, run_dir, out_dir, t, start_time = run.cfg, run.dirs.root, run.out, run.cfg.train, time.time()
    s = setup(run)
    try:
        checkpoints = run.dirs.checkpoints
        progress = (load_checkpoint(s.engine, checkpoints, s.config_hash) if t.resume else None) or Progress()
        if progress.step and D.is_main():
            print(f"[train] resumed from step {progress.step} of {s.total_steps}")
        wandb_run = _wandb(cfg, run_dir, s.config_hash)
        bar = tqdm(total=s.total_steps, initial=progress.step, unit="step", desc="train",
                   disable=not D.is_main() or not cfg.logging.progress)  # fmt: skip
        while progress.step < s.total_steps:
            train_step(s, cfg, progress)
            done = progress.step
            if done % t.log_every == 0 or done == s.total_steps:
                log_and_evaluate(s, cfg, progress, wandb_run, bar)
            bar.update(1)
            if done % t.checkpoint_every == 0 and done < s.total_steps:
                save_checkpoint(s.engine, checkpoints, progress, s.config_hash, s.total_steps, run.inputs["sections"])
        bar.close()
        if D.is_main() and checkpoints.exists():  # finished: nothing left to resume
            write_run_info(checkpoints, s.config_hash, s.total_steps, s.total_steps, run.inputs["sections"])
        final = save_heads(s, cfg, progress, out_dir, start_time)
        if wandb_run is not None:
            wandb_run.finish()
        D.barrier()
    finally:
        end_zero3_base(s)
    return final


def _heads_args(heads: MedusaHeads) -> dict:
    c = heads.config
    return {
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.medusa_num_heads,
        "num_layers": c.medusa_num_layers,
        "head_type": c.head_type,
        "base_model_name_or_path": c.base_model_name_or_path,
        "token_map": heads.token_map,
    }


def _per_head(metrics: dict[str, float], prefix: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"loss": [], "top1": [], "top5": []}
    k = 0
    while f"{prefix}/head{k}/top1" in metrics:
        for name in out:
            out[name].append(metrics[f"{prefix}/head{k}/{name}"])
        k += 1
    return out


def _plot(history: list[dict], num_heads: int, path: Path) -> None:
    """Per-head held-out (or train) top-1 accuracy over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "eval"):
        for k in range(num_heads):
            pts = [(r["step"], r[f"{split}/head{k}/top1"]) for r in history if f"{split}/head{k}/top1" in r]
            if pts:
                ax.plot(
                    *zip(*pts),
                    ls="-" if split == "eval" else ":",
                    marker="o" if split == "eval" else None,
                    label=f"{split} head {k}",
                    color=f"C{k}",
                )
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Medusa heads: top-1 accuracy (dotted: train, solid: held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train(run: StageRun) -> None:
    """Stage entry point: train the heads and write heads/ (config.json, weights, training_summary.json)."""
    train(run)
