"""`medusa-train CONFIG.yaml [--set key=value ...] [--stages data,train] [--output-dir DIR] [--resume] [--force]`.

Runs the same way as a plain process, under `deepspeed` and under `torchrun`. The config and every file it names are
checked before any model loads. Exit codes (medusa_toolkit.errors): 0 ok, 1 the verify stage found Medusa output
that differs from the base's (or crashed), 2 bad input or a load error, 3 acceptance below verify.min_accept_length,
130 interrupted (rerun with --resume to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medusa_toolkit.errors import ToolkitError
from medusa_toolkit.pipeline.cli import Shortcut, add_config_arguments, config_from_args, run_command
from medusa_toolkit.run_dir import RunDir

SHORTCUTS = [
    Shortcut("--output-dir", "output_dir", "run directory"),
    Shortcut(
        "--stages",
        "stages",
        "comma-separated stages to run, e.g. data,train",
        convert=lambda text: [s.strip() for s in text.split(",") if s.strip()],
    ),
    Shortcut("--resume", "train.resume", "continue training from the latest checkpoint", value=True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="medusa-train",
        description="Self-distill Medusa heads (data -> train -> tree -> verify -> export).",
        epilog="Exit codes: 0 ok, 1 not lossless (verify stage), 2 bad input or load error, 3 acceptance below "
        "verify.min_accept_length, 130 interrupted.",
    )
    add_config_arguments(p, SHORTCUTS, required=True)
    p.add_argument("--force", action="store_true", help="rerun stages even when cached (an interrupted training run's "
                   "checkpoints are discarded and training starts over)")  # fmt: skip
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def verify_exit_code(run_dir: Path, stages: list[str]) -> int:
    """The verify stage's verdict as an exit code (0 when verify was not part of this run)."""
    if "verify" not in stages:
        return 0
    try:
        return int(json.loads(RunDir(run_dir).report.read_text())["verdict"]["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = config_from_args(args, SHORTCUTS)

    from medusa_toolkit import distributed as D
    from medusa_toolkit.pipeline.stages import check_inputs, run_pipeline
    from medusa_toolkit.pipeline.summary import pipeline_summary

    check_inputs(cfg, cfg.stages)  # every file the config names, before DeepSpeed or any model loads
    D.init_distributed()
    log = print if D.is_main() else (lambda *a, **k: None)
    run_dir = Path(cfg.output_dir)
    try:
        run_pipeline(cfg, run_dir, cfg.stages, force=args.force, log=log)
    except ToolkitError as e:
        code = verify_exit_code(run_dir, cfg.stages)
        if code:  # e.g. a push refused because verification failed: the verdict is the honest exit code
            print(f"medusa-train: error: {e}", file=sys.stderr)
            return code
        raise
    log(pipeline_summary(cfg.output_dir))
    return verify_exit_code(run_dir, cfg.stages)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `medusa-train`; returns the process exit code."""
    hint = (
        "finished stages, generated data shards and training checkpoints are kept: rerun the same command with "
        "--resume to continue"
    )
    return run_command("medusa-train", lambda: run(argv), interrupted_hint=hint)


if __name__ == "__main__":
    sys.exit(main())
