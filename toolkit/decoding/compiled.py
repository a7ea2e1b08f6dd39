"""The compiled decoding step: gpt-fast's lesson (compile the one-token decode) applied to our step, on CPU.

Eager PyTorch runs a decoding step's GEMMs far below what the memory streams: SmolLM2-135M's 538 MB of weights take
~45 ms through `F.linear` where the bandwidth allows ~15 ms, and an M-row product costs nearly twice a one-row one.
`compile_decoding` hands `MedusaModel.step` (the base's forward over a step's new tokens, and its logits) and
`MedusaModel.medusa_logits` (the heads) to `torch.compile` with inductor's freezing (weights become constants,
packed once) and max-autotune's C++ GEMM template, with dynamic shapes: one compiled graph serves every tree size,
batch size and KV length (no recompile per step; `recompiles` counts them). Prefill stays eager (long, once per
prompt). Decoding code calls `model.step_fn` / `model.heads_fn` and never knows which it got.

The compiled GEMMs are inductor's C++ template only (not ATen's MKL, which autotune may otherwise pick): it keeps a
row's K reduction in one thread and one order whatever the number of rows (`cpp.gemm_max_k_slices = 1`), so a node's
projections are bitwise the same in every tree of 2 or more nodes (tests check it). Two things still separate a
tree node from a one-token step in the last bits (benchmarks/RESULTS.md, "Batch invariance"): torch.compile
specialises size 1, so the one-token step is a graph of its own with other GEMM code (marking the sizes unbacked
removes that, but multiplied the recompiles by 5 on a tiny model); and the CPU SDPA kernel's blocking depends on how
many queries and keys it sees. Tokens are still exact wherever the base's top two logits are not within that
rounding of each other; medusa-verify runs its reference through this same step and counts any such tie.

Compile and autotune cost minutes on two cores, and measured in `make demo` they are paid again in every process:
with freezing on, inductor does not reuse its cache (`TORCHINDUCTOR_CACHE_DIR`) between processes. That is why
`model.compile: auto` stays eager for now (AUTO_COMPILES) and `on` is the opt-in.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from medusa_toolkit.errors import ToolkitError

COMPILE_CHOICES = ("auto", "on", "off")
# `auto` compiles bases at least this big: below it (test-sized models) compiling costs far more than it saves.
# SmolLM2-135M's GEMMs went from ~46 to ~17 ms compiled on 2 cores (benchmarks/RESULTS.md, "Compiled decoding step").
AUTO_MIN_WEIGHT_BYTES = 64 * 2**20
# ... and decodes at most this many rows at once. Measured on 2 cores (SmolLM2-135M): batch 1 is where the compiled
# step pays (decoding, verify, the tree tuner); the data stage's greedy answers at batch 64 ran 1.9x slower compiled
# (66 vs 128 tokens/s) and stay eager unless model.compile is `on`.
AUTO_MAX_BATCH = 1
# Measured in `make demo` on a 2-core EPYC: the tree stage's first compile took 9.5 min, and every later process
# (verify, a benchmark) compiled again (386 s): frozen graphs are not in inductor's cache. Until the compile is paid
# once per machine, `auto` stays eager and `on` is the opt-in.
AUTO_COMPILES = False
# Inductor settings of the compiled step (CPU): weights frozen into the graph and packed once, the C++ GEMM template
# for every GEMM (ATen's MKL kernels are not row-invariant), no split of a GEMM's K across threads.
CPU_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "cpp.gemm_max_k_slices": 1,
}
# On a GPU (model.compile: on only; `auto` leaves GPUs eager, where the compiled step is not measured by default):
# frozen weights, inductor's own Triton kernels; no autotune, whose minutes a check on a lent GPU cannot spend.
GPU_OPTIONS = {"freezing": True}


class CompileError(ToolkitError, RuntimeError):
    """The decoding step cannot be compiled here (no C++ compiler, an attention that cannot be traced)."""


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decide(model: Any, choice: str, attn: str, batch_size: int = 1) -> tuple[bool, str]:
    """(compile?, why) for `model.compile` = choice on this machine, with this attention implementation, for a
    decoder that runs `batch_size` rows at once."""
    if choice not in COMPILE_CHOICES:
        raise CompileError(f"model.compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    if choice == "off":
        return False, "model.compile: off"
    problem = None
    if attn == "medusa_flash_decoding":
        problem = "the Flash-Decoding kernel's attention (a Triton call) is not traced; use attention sdpa or eager"
    elif model.device.type != "cpu" and choice == "auto":
        problem = f"`auto` compiles on CPUs, where it is measured; this model is on {model.device.type} (`on` compiles)"
    elif (
        model.device.type == "cpu"
        and shutil.which(os.environ.get("CXX", "g++")) is None
        and shutil.which("c++") is None
    ):
        problem = "inductor needs a C++ compiler (g++), and none is on PATH"
    if choice == "on" and problem:
        raise CompileError(f"model.compile: on, but {problem}")
    if problem:
        return False, problem
    if choice == "auto" and weight_bytes(model.base) < AUTO_MIN_WEIGHT_BYTES:
        return False, f"a base under {AUTO_MIN_WEIGHT_BYTES >> 20} MB decodes faster eager than it compiles"
    if choice == "auto" and batch_size > AUTO_MAX_BATCH:
        return False, f"batches of {batch_size} rows decode faster eager here (the compiled step pays at batch 1)"
    if choice == "auto" and not AUTO_COMPILES:
        return False, ("`auto` keeps decoding eager for now: a compile costs 6-9 min in every process on 2 cores "
                       "(inductor does not cache frozen graphs between processes), more than a run's decoding "
                       "saves; model.compile: on compiles")  # fmt: skip
    return True, f"model.compile: {choice}"


def compile_decoding(
    model: Any, choice: str = "on", attn: str = "sdpa", log: Callable = print, batch_size: int = 1
) -> bool:
    """Set up `model.step_fn` / `model.heads_fn` as compiled functions (idempotent) when `decide` says so; returns
    whether the model now decodes through the compiled step. Call it once per model, before decoding."""
    wanted, why = decide(model, choice, attn, batch_size)
    if not wanted or model.compiled:
        return model.compiled
    options = CPU_OPTIONS if model.device.type == "cpu" else GPU_OPTIONS
    model.step_fn = _with_options(torch.compile(model.step, dynamic=True), options)
    model.heads_fn = _with_options(torch.compile(model.medusa_logits, dynamic=True), options)
    model.compiled = True
    log(f"decoding: compiled step ({why}); the first call compiles and autotunes (minutes the first time on a "
        f"machine; cached in {cache_location()})")  # fmt: skip
    return True


def cache_location() -> str:
    """Where inductor keeps what it compiled and chose (reused by later processes on this machine)."""
    from torch._inductor.runtime.runtime_utils import cache_dir

    return cache_dir()


def _with_options(compiled: Callable, options: dict[str, Any] = CPU_OPTIONS) -> Callable:
    """`compiled` called under inductor `options` (CPU_OPTIONS by default). Freezing is read from inductor's global config when a graph compiles
    (torch.compile's `options=` does not reach it), and compiles happen at first calls and recompiles: so the
    settings are in force around every call, and nowhere else in the process."""
    import torch._inductor.config as inductor_config

    def call(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(options):
            return compiled(*args, **kwargs)

    return call


def warm_up(model: Any, tree_sizes: tuple[int, ...] = (1, 2), log: Callable = print) -> float:
    """Compile now (a throwaway prefix and one step per tree size given), so the first timed or user-facing step is
    not the one that compiles; returns the seconds it took. A no-op for an eager model."""
    if not model.compiled:
        return 0.0
    from medusa_toolkit.decoding.generate import Greedy, decode_step, prefill
    from medusa_toolkit.model.tree import MedusaTree

    start = time.perf_counter()
    prompt = torch.zeros(1, 8, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        for n in tree_sizes:
            tree = MedusaTree.chain(min(n - 1, model.num_heads))
            state = prefill(model, prompt, None, tree.depth, Greedy())
            decode_step(model, state, tree, tree.buffers(model.device), "sdpa", Greedy())
    seconds = time.perf_counter() - start
    log(f"decoding: compiled step ready in {seconds:.0f} s")
    return seconds


def recompiles() -> int:
    """Graphs dynamo compiled so far in this process (a decode must not add one per step)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
