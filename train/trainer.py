"""Stage `train`: Medusa heads on a frozen base model, trained with a DeepSpeed engine.

The base runs frozen (eval, no grad) to give the last hidden states; only the heads (wrapped with the loss in
`MedusaObjective`) go into the engine. The data order is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would: checkpoints hold the DeepSpeed state (heads, optimizer, scheduler), the step
and every rank's RNG state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.heads import MedusaHeads
from medusa_toolkit.models import load_base_model
from medusa_toolkit.train import distributed as D
from medusa_toolkit.train.data import load_data
from medusa_toolkit.train.losses import MedusaObjective

SUMMARY = "training_summary.json"
KEEP_CHECKPOINTS = 2


class TrainError(ToolkitError, ValueError):
    """Training cannot start (bad DeepSpeed file, incompatible checkpoint, ...); the message says what to do."""


def config_hash(cfg: ToolkitConfig) -> str:
    """Hash of everything the trained heads depend on (resume refuses a checkpoint from another config)."""
    d = asdict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k != "resume"}
    payload = {k: d[k] for k in ("model", "heads", "data", "train")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def collate(rows: list[dict], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-pad (causal: padding after a sequence never changes its hidden states); mask the padding; lengths."""
    width = min(max_len, max(len(r["input_ids"]) for r in rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x = r["input_ids"][:width]
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = torch.tensor(r["loss_mask"][:width])
    return ids.to(device), mask.to(device), [min(len(r["input_ids"]), width) for r in rows]


class Teacher:
    """The frozen base's last hidden states for a batch, optionally cached per sequence (later epochs skip the base)."""

    def __init__(self, base, cache: bool):
        self.base, self.decoder = base, base.get_decoder()
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def __call__(self, indices: list[int], ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.cache is not None and all(i in self.cache for i in indices):
            hidden = ids.new_zeros((*ids.shape, self.base.config.hidden_size), dtype=self.base.dtype)
            for row, i in enumerate(indices):
                h = self.cache[i][: ids.shape[1]]
                hidden[row, : h.shape[0]] = h
            return hidden
        hidden = self.decoder(input_ids=ids).last_hidden_state
        if self.cache is not None:
            for row, (i, n) in enumerate(zip(indices, lengths)):
                self.cache[i] = hidden[row, :n].clone()
        return hidden


def build_heads(cfg: ToolkitConfig, base) -> MedusaHeads:
    h = cfg.heads
    if h.init_from:
        from medusa_toolkit.medusa_model import load_heads

        heads = load_heads(h.init_from)
        heads.check_compatible(base)
        return heads
    vocab, hidden = base.get_output_embeddings().weight.shape
    heads = MedusaHeads(hidden, vocab, h.num_heads, h.num_layers, h.head_type, cfg.model.name_or_path)
    heads.init_from_lm_head(base.get_output_embeddings().weight)
    return heads.float()


def _gathered(engine):
    """Context with the (possibly ZeRO-3 partitioned) heads parameters gathered on every rank."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(engine, run_dir: Path, step: int, state: dict) -> None:
    """DeepSpeed checkpoint + data position + every rank's RNG state; keep the newest KEEP_CHECKPOINTS."""
    from safetensors.torch import save_file

    ckpt = _checkpoint_dir(run_dir)
    tag = f"step-{step:07d}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=state)
    save_file({"cpu": torch.get_rng_state()}, str(ckpt / tag / f"rng-rank{D.rank()}.safetensors"))
    D.barrier()
    if D.is_main():
        old = sorted(p for p in ckpt.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    D.barrier()


def load_checkpoint(engine, run_dir: Path, chash: str) -> dict | None:
    """Restore the latest checkpoint; None when there is none."""
    from safetensors.torch import load_file

    ckpt = _checkpoint_dir(run_dir)
    if not (ckpt / "latest").is_file():
        return None
    path, state = engine.load_checkpoint(str(ckpt))
    if path is None:
        return None
    if state.get("config_hash") != chash:
        raise TrainError(
            f"the checkpoint in {ckpt} was written by another config (hash {state.get('config_hash')} vs {chash}); "
            "rerun without --resume to start over, or use the original config"
        )
    tag = (ckpt / "latest").read_text().strip()
    rng = ckpt / tag / f"rng-rank{D.rank()}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["cpu"])
    return state


def _wandb(cfg: ToolkitConfig, run_dir: Path, chash: str):
    mode = cfg.logging.wandb_mode
    if not D.is_main() or mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    run = wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.run_name or f"medusa-{chash}",
        mode=mode,
        dir=str(run_dir),
        config=asdict(cfg),
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
        ids, mask, lengths = collate([ds[i] for i in idx], max_len, device)
        if b >= n_batches:
            mask = torch.zeros_like(mask)
        hidden = teacher([offset + i for i in idx], ids, lengths)
        _, s = engine(hidden, ids, mask)
        stats = s if stats is None else stats + s
    engine.train()
    return D.all_reduce_sum(stats)


def train(cfg: ToolkitConfig, run_dir: Path, out_dir: Path | None, stop_at: int | None = None) -> MedusaHeads:
    """Train the heads; write them (rank 0) into out_dir. `stop_at`: checkpoint and return after that step (tests)."""
    import deepspeed

    D.init_distributed()
    run_dir, t = Path(run_dir), cfg.train
    start_time = time.time()
    chash = config_hash(cfg)
    ds_config = deepspeed_config(cfg)  # before loading anything: a bad file fails fast
    train_ds, eval_ds = load_data(run_dir)
    if len(train_ds) == 0:
        raise TrainError(f"the data artefact in {run_dir / 'data'} has no training sequences; raise data.num_prompts")
    device = D.device() if cfg.model.device is None else torch.device(cfg.model.device)
    base, _ = load_base_model(cfg.model.name_or_path, cfg.model.dtype, device)
    torch.manual_seed(t.seed)
    heads = build_heads(cfg, base)
    lm_head = base.get_output_embeddings().weight
    objective = MedusaObjective(
        heads,
        lm_head,
        t.loss,
        t.head_weight_decay,
        t.kl_temperature,
        t.kl_top_k,
        getattr(base.config, "final_logit_softcapping", None),
    )

    micro, accum, world = (
        t.micro_batch_size,
        ds_config.get("gradient_accumulation_steps", t.gradient_accumulation_steps),
        D.world_size(),
    )
    if "train_batch_size" in ds_config:
        micro = ds_config.get("train_micro_batch_size_per_gpu", micro)
        accum = ds_config["train_batch_size"] // (micro * world)
    global_batch = micro * accum * world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(train_ds) / global_batch))
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95))
        if "scheduler" not in ds_config:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(total_steps, t.warmup_ratio, t.min_lr_ratio)
            )
    engine, *_ = deepspeed.initialize(
        model=objective, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    start_step, tokens_seen = 0, 0
    if t.resume:
        state = load_checkpoint(engine, run_dir, chash)
        if state is not None:
            start_step, tokens_seen = state["step"], state["tokens"]
            if D.is_main():
                print(f"[train] resumed from step {start_step} of {total_steps}")
    elif D.is_main() and _checkpoint_dir(run_dir).exists():
        shutil.rmtree(_checkpoint_dir(run_dir))  # a fresh run: stale checkpoints must never be resumed later
    D.barrier()

    teacher = Teacher(base, t.teacher_cache)
    run = _wandb(cfg, run_dir, chash)
    history: list[dict] = []
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        desc="train",
        disable=not D.is_main() or not cfg.logging.progress,
    )
    window_stats, window_tokens, window_start = None, 0, time.time()
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    for step in range(start_step, total_steps):
        order = data_order(len(train_ds), t.seed, step * global_batch, global_batch)
        for m in range(accum):
            chunk = order[(m * world + D.rank()) * micro : (m * world + D.rank() + 1) * micro]
            ids, mask, lengths = collate([train_ds[i] for i in chunk], t.max_seq_len, device)
            hidden = teacher(chunk, ids, lengths)
            loss, stats = engine(hidden, ids, mask)
            engine.backward(loss)
            engine.step()
            window_stats = stats if window_stats is None else window_stats + stats
            window_tokens += sum(lengths)
        done = step + 1
        if done % t.log_every == 0 or done == total_steps:
            agg = D.all_reduce_sum(window_stats.clone())
            n_tok = int(D.all_reduce_sum(torch.tensor([window_tokens], dtype=torch.float64))[0])
            tokens_seen += n_tok
            tok_s = n_tok / max(time.time() - window_start, 1e-9)
            train_metrics = _metrics(agg, "train")
            row = {
                "step": done,
                "tokens": tokens_seen,
                "tokens_per_s": tok_s,
                "lr": engine.get_lr()[0],
                **train_metrics,
            }
            if done % t.eval_every == 0 or done == total_steps:
                if len(eval_ds):
                    eval_metrics = _metrics(
                        evaluate(engine, teacher, eval_ds, len(train_ds), micro, t.max_seq_len, device), "eval"
                    )
                    row.update(eval_metrics)
            history.append(row)
            if run is not None:
                run.log(row)
            bar.set_postfix(
                loss=f"{train_metrics['train/head0/loss']:.3f}",
                acc0=f"{train_metrics['train/head0/top1']:.2f}",
                tok_s=f"{tok_s:.0f}",
                refresh=False,
            )
            window_stats, window_tokens, window_start = None, 0, time.time()
        bar.update(1)
        if done % t.checkpoint_every == 0 or done == stop_at:
            save_checkpoint(
                engine, run_dir, done, {"step": done, "tokens": tokens_seen, "config_hash": chash, "seed": t.seed}
            )
        if done == stop_at:
            bar.close()
            return heads
    bar.close()

    with _gathered(engine):
        final = MedusaHeads(**{k: v for k, v in _heads_args(heads).items()})
        final.load_state_dict({k: v.detach().float().cpu() for k, v in heads.state_dict().items()})
    if D.is_main() and out_dir is not None:
        final.save_pretrained(out_dir)
        summary = {
            "steps": total_steps,
            "tokens": tokens_seen,
            "train_sequences": len(train_ds),
            "heldout_sequences": len(eval_ds),
            "world_size": world,
            "global_batch": global_batch,
            "loss": t.loss,
            "head_type": heads.head_type,
            "num_heads": heads.num_heads,
            "final_train": _per_head(train_metrics, "train"),
            "final_heldout": _per_head(eval_metrics, "eval"),
            "tokens_per_s": tokens_seen / max(time.time() - start_time, 1e-9),
            "wall_time_s": time.time() - start_time,
            "config_hash": chash,
        }
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        _plot(history, heads.num_heads, out_dir / "accuracy.png")
        acc = ", ".join(f"{a:.2f}" for a in summary["final_heldout"].get("top1", []))
        print(
            f"[train] {total_steps} steps, {tokens_seen} tokens in {summary['wall_time_s']:.0f}s; held-out top-1 per head: {acc}"
        )
    if run is not None:
        run.finish()
    D.barrier()
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


def run_train(cfg: ToolkitConfig, run_dir: Path, out_dir: Path) -> None:
    """Stage entry point: train the heads and write heads/ (config.json, weights, training_summary.json)."""
    train(cfg, run_dir, out_dir)
