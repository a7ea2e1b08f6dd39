"""Process-group setup that works the same under `deepspeed`, `torchrun` and as a plain single process.

A plain `medusa-train` call sets up a world of one itself (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the
training code never branches on "distributed or not". CPU runs use gloo; CUDA runs NCCL (DeepSpeed picks it).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from medusa_toolkit.errors import ToolkitError


class DistributedSetupError(ToolkitError, RuntimeError):
    """The process group cannot start (a port in use, an unreachable master); the message says what to change."""


# A first JIT build of DeepSpeed's CPU communication op takes about a minute; a build lock this old was left by a build
# that was killed (SIGTERM/SIGKILL skip torch's cleanup), and torch's FileBaton would wait on it forever.
STALE_BUILD_LOCK_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_stale_build_locks() -> list[Path]:
    """Remove the JIT-build lock files of torch extensions (TORCH_EXTENSIONS_DIR, or torch's default root) older than
    STALE_BUILD_LOCK_S, saying so on stderr; returns them. A live build holds its lock for about a minute."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <root>/<op>/lock, or <root>/py311_cpu/<op>/lock
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale build lock left by a killed run (it would hang this one): {lock}",
                      file=sys.stderr)  # fmt: skip
        except FileNotFoundError:  # another rank removed it first
            pass
    return removed


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (idempotent); a bare process becomes a world of one."""
    if dist.is_available() and dist.is_initialized():
        return
    clear_stale_build_locks()
    if "RANK" not in os.environ:  # not under a launcher: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    import deepspeed

    if torch.cuda.is_available():
        # Before anything allocates: a ZeRO-3 base is partitioned onto the *current* device at from_pretrained.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    except dist.DistNetworkError as e:  # e.g. MASTER_PORT taken by another process: the user's setting, not a bug
        raise DistributedSetupError(
            f"could not start the process group at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f"({str(e).strip().splitlines()[-1][:200]}); pick a free port (MASTER_PORT, --master_port) or unset the "
            "launcher variables (RANK, WORLD_SIZE, MASTER_PORT) for a plain run"
        ) from None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This rank's device: its local GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it; a no-op for a world of one."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_true(flag: bool) -> bool:
    """True only when `flag` is true on every rank (a collective: all ranks call it at the same point). Decisions that
    change which collectives a rank runs (e.g. skipping a ZeRO-3 partitioned base's forward) must be taken with it."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device() if dist.get_backend() == "nccl" else None)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a collective); the object itself for a world of one."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
