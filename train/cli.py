"""`medusa-train CONFIG.yaml [--set key=value ...] [--stages data,train] [--output-dir DIR] [--resume]`.

Runs the same way as a plain process, under `deepspeed` and under `torchrun`. The config is validated before any
model is loaded; a bad config exits with code 2 and a message naming the key and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_CONFIG = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="medusa-train", description="Self-distill Medusa heads (data -> train -> tree -> verify -> export)."
    )
    p.add_argument("config", help="YAML config, e.g. configs/smollm2-135m.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=100 (repeatable)",
    )
    p.add_argument("--stages", help="comma-separated stages to run (default: the config's `stages`), e.g. data,train")
    p.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue training from the latest checkpoint")
    p.add_argument("--force", action="store_true", help="rerun stages even when their artefact is cached")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `medusa-train`; returns the process exit code."""
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from medusa_toolkit.config import ConfigError, load_config
    from medusa_toolkit.stages import STAGES, run_pipeline

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else cfg.stages
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)} in --stages; stages are {', '.join(STAGES)}")
    except ConfigError as e:
        print(f"medusa-train: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.output_dir:
        cfg.output_dir = args.output_dir

    from medusa_toolkit.errors import ToolkitError
    from medusa_toolkit.summary import pipeline_summary
    from medusa_toolkit.train import distributed as D

    D.init_distributed()
    log = print if D.is_main() else (lambda *a, **k: None)
    try:
        run_pipeline(cfg, cfg.output_dir, stages, force=args.force, log=log)
    except ToolkitError as e:  # expected failures (bad input, missing artefacts, refused push): one clear message
        print(f"medusa-train: {e}", file=sys.stderr)
        return 1
    log(pipeline_summary(cfg.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
