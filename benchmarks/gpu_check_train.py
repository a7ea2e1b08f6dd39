"""gpu_check.py section d, `train`: bf16 head-training steps through DeepSpeed when it imports, else plain torch."""

from __future__ import annotations

import math
import os
import time

from gpu_check_e2e import build_base
from gpu_check_run import Run, Sizes


def section_train(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch

    from medusa_toolkit import MedusaHeads
    from medusa_toolkit.train.losses import MedusaObjective
    from medusa_toolkit.tuning.timing import sync

    base = build_base(sizes, device).to(torch.bfloat16)
    n, length = sizes.train_batch
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, base.config.vocab_size, (n, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4, head_type="per_head_lm_head").to(device)
    heads.init_from_lm_head(base.get_output_embeddings().weight.float())
    objective = MedusaObjective(heads, base.get_output_embeddings().weight, loss="ce", decay=0.8)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    try:
        import deepspeed
    except Exception as e:  # not installed here (the GPU image has no DeepSpeed unless its wheel travels)
        deepspeed, why = None, f"{type(e).__name__}: {e}"
    if deepspeed is not None:
        how = f"deepspeed {deepspeed.__version__} (ZeRO-0, bf16, torch AdamW)"
        _init_world_of_one(deepspeed, device)
        engine, *_ = deepspeed.initialize(
            model=objective,
            model_parameters=params,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": n,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 0},
                "bf16": {"enabled": True},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )

        def step(hidden):
            loss, stats = engine(hidden, ids, mask)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        how = f"plain torch (bf16 autocast, fp32 AdamW): DeepSpeed unavailable ({why})"

        def step(hidden):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, stats = objective(hidden, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return loss

    run.log(f"   training through {how}")
    losses, times = [], []
    for _ in range(sizes.train_steps):
        # The steps themselves are short; what can eat the section's time is DeepSpeed's first start (a CPU build of
        # its shm op takes a minute), so only the whole run's deadline stops them.
        if losses and time.perf_counter() > run.deadline:
            break
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hidden = base.get_decoder()(ids).last_hidden_state  # the frozen base forward, as in the train stage
        losses.append(float(step(hidden).detach()))
        sync(device)
        times.append(time.perf_counter() - t)
    if not losses:
        return {"how": how, "deepspeed": deepspeed is not None, "steps": 0, "status": "fail", "reason": "no time left"}
    timed = times[1:] or times  # the first step pays for allocations and autotuning
    tps = n * length * len(timed) / sum(timed)
    run.log(f"   {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tps:.0f} tokens/s")
    ok = len(losses) == sizes.train_steps and all(math.isfinite(x) for x in losses)
    return {
        "how": how,
        "deepspeed": deepspeed is not None,
        "steps": len(losses),
        "batch": [n, length],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_s": round(tps, 1),
        "status": "ok" if ok else "fail",
    }


def _init_world_of_one(deepspeed, device) -> None:
    import socket

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
