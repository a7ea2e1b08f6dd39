"""medusa-export: package trained Medusa heads for the Hub, TGI, vLLM and TensorRT-LLM, and optionally push them.

medusa-export --heads runs/x/heads --out runs/x/export --format all --push-to-hub my-org/smollm2-medusa
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medusa_toolkit.export.package import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--heads", required=True, help="heads folder, weights file or Hub id (ours, upstream Medusa, .pt, vLLM)"
    )
    p.add_argument("--out", required=True, help="output folder: packages go to OUT/medusa and OUT/vllm")
    p.add_argument("--format", default="medusa", choices=[*FORMATS, "all"], help="package layout(s) to write")
    p.add_argument(
        "--run-dir", help="run folder with tree/, verify/, config.resolved.yaml (default: the heads' parent)"
    )
    p.add_argument("--base-model", help="base model (default: the heads' base_model_name_or_path)")
    p.add_argument("--tree", help="tree.json to ship (default: RUN_DIR/tree/tree.json)")
    p.add_argument("--verification", help="verify report.json (default: RUN_DIR/verify/report.json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: the heads')")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the base tokenizer into the medusa package")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="push the medusa package here (vllm: ORG/NAME-vllm)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", metavar="MSG")
    p.add_argument("--allow-unverified", action="store_true", help="push even without a passing verification report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medusa_toolkit.export.hub import HubPushError
    from medusa_toolkit.export.package import export_packages, resolve_formats
    from medusa_toolkit.export.stage import ExportError, check_push_allowed, gather_inputs, push_packages, read_json
    from medusa_toolkit.heads import HeadsLoadError
    from medusa_toolkit.models import ModelLoadError, resolve_dtype

    heads_path = Path(args.heads)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and heads_path.is_dir() and any((heads_path.parent / d).is_dir() for d in ("tree", "verify")):
        run_dir = heads_path.parent
    try:
        formats = resolve_formats(args.format)
        if args.push_to_hub:  # fail before loading anything
            report = args.verification or (run_dir / "verify" / "report.json" if run_dir else None)
            check_push_allowed(read_json(report), args.allow_unverified, str(report) if report else "no report given")
        inputs = gather_inputs(
            args.heads, run_dir, base_model=args.base_model, tree=args.tree, verification=args.verification,
            include_tokenizer=not args.no_tokenizer,
        )  # fmt: skip
        folders = export_packages(
            inputs, args.out, formats, dtype=resolve_dtype(args.dtype) if args.dtype else None, repo_id=args.push_to_hub
        )
        for fmt, folder in folders.items():
            print(f"[export] {fmt} package: {folder}")
        if args.push_to_hub:
            for r in push_packages(
                folders, args.push_to_hub, private=args.private, revision=args.revision, create_pr=args.create_pr,
                commit_message=args.commit_message,
            ):  # fmt: skip
                print(f"[export] {r.repo_id}: {r.pr_url or r.commit_url}")
    except (ExportError, HubPushError, HeadsLoadError, ModelLoadError, ValueError) as e:
        print(f"medusa-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
