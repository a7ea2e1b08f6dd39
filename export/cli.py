"""medusa-export: package trained Medusa heads for the Hub, TGI, vLLM and TensorRT-LLM, and optionally push them.

    medusa-export --heads runs/x/heads --out runs/x/export --push-to-hub my-org/smollm2-medusa
    medusa-export configs/smollm2-135m.yaml            # that run's heads, tree and report -> OUTPUT_DIR/export

Every flag but the paths is a shortcut for an `export.*` config key. A push is refused unless a passing verify report
names exactly these heads (and the shipped tree). Exit codes: 0 ok, 2 bad input, a load error or a refused push,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medusa_toolkit.config import ConfigError
from medusa_toolkit.pipeline.cli import (
    Shortcut,
    add_config_arguments,
    config_from_args,
    heads_argument,
    output_dir,
    run_command,
)
from medusa_toolkit.run_dir import RunDir, locked

SHORTCUTS = [
    Shortcut("--format", "export.formats", "package layout(s): medusa, vllm or all", choices=("medusa", "vllm", "all"),
             convert=lambda f: ["medusa", "vllm"] if f == "all" else [f]),
    Shortcut("--base-model-id", "export.base_model_id", "Hub id of the base written into the packages"),
    Shortcut("--dtype", "export.dtype", "weight dtype in the packages (null: the heads')",
             choices=("float32", "bfloat16", "float16")),
    Shortcut("--no-tokenizer", "export.include_tokenizer", "do not copy the base tokenizer into the medusa package",
             value=False),
    Shortcut("--push-to-hub", "export.push_to_hub", "push the medusa package to ORG/NAME (vllm: ORG/NAME-vllm)"),
    Shortcut("--private", "export.private", "create the Hub repo private", value=True),
    Shortcut("--revision", "export.revision", "branch to push to (created if missing)"),
    Shortcut("--create-pr", "export.create_pr", "open a pull request instead of committing", value=True),
    Shortcut("--commit-message", "export.commit_message", "Hub commit message"),
    Shortcut("--allow-unverified", "export.allow_unverified", "push even without a passing report for these heads",
             value=True),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p, SHORTCUTS)
    p.add_argument("--heads", help="heads folder, weights file or Hub id (the medusa layout, upstream's .pt, vLLM); default "
                   "with a CONFIG: OUTPUT_DIR/heads")  # fmt: skip
    p.add_argument("--out", help="output folder: packages go to OUT/medusa and OUT/vllm (default with a CONFIG: "
                   "OUTPUT_DIR/export)")  # fmt: skip
    p.add_argument(
        "--run-dir", help="run folder with tree/, verify/, config.resolved.yaml (default: the heads' parent)"
    )
    p.add_argument("--base-model", help="base model to load the lm_head/tokenizer from (default: CONFIG's "
                   "model.name_or_path, else the heads' base_model_name_or_path)")  # fmt: skip
    p.add_argument("--tree", help="tree.json to ship (default: RUN_DIR/tree/tree.json)")
    p.add_argument("--verification", help="verify report.json (default: RUN_DIR/verify/report.json)")
    return p


def run(argv: list[str] | None) -> int:
    from medusa_toolkit.export.stage import ExportRequest, export

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, SHORTCUTS)
    heads, run = heads_argument(args, cfg, "exported"), output_dir(args, cfg)
    out = args.out or (run.export if run else None)
    if out is None:
        raise ConfigError("--out is required (or pass the CONFIG of a run: packages go to its OUTPUT_DIR/export)")
    heads_path = Path(heads)
    run_dir = RunDir(args.run_dir) if args.run_dir else run
    beside = RunDir(heads_path.parent)  # heads inside a run folder: that run's tree and report
    if run_dir is None and heads_path.is_dir() and (beside.tree.is_dir() or beside.verify.is_dir()):
        run_dir = beside
    base = args.base_model or (cfg.model.name_or_path if args.config else None)
    req = ExportRequest(
        heads, run_dir, base_model=base, base_model_id=cfg.export.base_model_id, tree=args.tree,
        verification=args.verification, include_tokenizer=cfg.export.include_tokenizer,
    )  # fmt: skip
    with locked(run if not args.out else None, "medusa-export"):  # it writes into the run's export/
        export(cfg, req, Path(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("medusa-export", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
