"""`medusa-tune-tree`: choose a Medusa tree for given heads from measured acceptance and measured latency."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-tune-tree",
        description="Tune the Medusa tree: calibrate joint head acceptance on held-out text, time verification steps "
        "on this device, pick the tree with the best predicted tokens/s (or accepted length), check it by decoding.",
    )
    p.add_argument("--base", required=True, help="base model: Hub id, local folder, .gguf, or smollm2-135m-instruct")
    p.add_argument("--heads", required=True, help="heads folder (config.json + medusa_lm_head.safetensors) or Hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data", help="data-stage folder (datasets on disk with input_ids/loss_mask; eval split preferred)"
    )
    src.add_argument(
        "--prompts", help="prompts file (.txt one per line, .jsonl/.json/.parquet/.csv with --prompt-field)"
    )
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt text (default: prompt)")
    p.add_argument("--max-nodes", type=int, default=64, help="largest tree to consider, root included (default 64)")
    p.add_argument("--max-depth", type=int, default=None, help="deepest path (default: the number of heads)")
    p.add_argument("--top-k", type=int, default=10, help="candidates per head considered (default 10)")
    p.add_argument("--objective", choices=("speed", "acceptance"), default="speed")
    p.add_argument("--out", default="tree.json", help="tree.json to write; plots go next to it (default tree.json)")
    p.add_argument("--num-prompts", type=int, default=32, help="calibration prompts/rows (default 32)")
    p.add_argument(
        "--num-validation-prompts", type=int, default=8, help="prompts decoded to check (0: skip; default 8)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--prefix-length", type=int, default=256, help="KV-cache length at which steps are timed")
    p.add_argument("--batch-size", type=int, default=1, help="batch size at which steps are timed (default 1)")
    p.add_argument("--latency-repeats", type=int, default=5, help="timed repeats per budget (median used)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument(
        "--attn", default="sdpa", choices=("sdpa", "eager", "medusa_flash_decoding"), help="attention for decoding"
    )
    p.add_argument("--no-chat-template", action="store_true", help="render prompts as plain text")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in (
        "max_nodes",
        "top_k",
        "num_prompts",
        "max_new_tokens",
        "prefix_length",
        "batch_size",
        "latency_repeats",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"medusa-tune-tree: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_validation_prompts < 0:
        raise SystemExit("medusa-tune-tree: --num-validation-prompts must be >= 0")
    if args.prompts and not Path(args.prompts).is_file():
        raise SystemExit(f"medusa-tune-tree: prompts file not found: {args.prompts}")
    if args.prompts and Path(args.prompts).suffix.lower() not in TEXT_SUFFIXES:
        raise SystemExit(f"medusa-tune-tree: --prompts must be one of {', '.join(TEXT_SUFFIXES)}, got {args.prompts}")
    if args.data and not Path(args.data).is_dir():
        raise SystemExit(f"medusa-tune-tree: data dir not found: {args.data}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    from medusa_toolkit.heads import HeadsLoadError, MedusaHeads
    from medusa_toolkit.medusa_model import MedusaModel
    from medusa_toolkit.models import ModelLoadError, load_base_model
    from medusa_toolkit.prompts import PromptError, load_prompts
    from medusa_toolkit.verify.calibration import CalibrationError
    from medusa_toolkit.verify.tune_tree import (
        TuneError,
        calibrate_and_split,
        load_eval_rows,
        prompt_token_ids,
        resolve_depth,
        tune_and_write,
    )

    progress = not args.no_progress
    try:
        heads = MedusaHeads.from_pretrained(args.heads)  # cheap, so a bad folder fails before the base loads
        depth = resolve_depth(args.max_depth, heads.num_heads)
        base, tokenizer = load_base_model(args.base, args.dtype, args.device, args.attn)
        model = MedusaModel(base, heads, tokenizer)
        total = args.num_prompts + args.num_validation_prompts
        rows, prompts, source = None, None, ""
        if args.data:
            rows = load_eval_rows(args.data, allow_train=True)
            if rows is not None and "no held-out split" in rows[2]:
                print(
                    f"warning: {rows[2]}: the heads may have trained on these rows; acceptance will look optimistic",
                    file=sys.stderr,
                )
        if rows is None:
            texts = (
                load_prompts(args.prompts, field=args.prompt_field, num=total)
                if args.prompts
                else load_prompts("chitchat", split="heldout", num=total)
            )
            source = args.prompts or "chitchat held-out prompts"
            prompts = prompt_token_ids(tokenizer, texts, not args.no_chat_template, None, 1024)
        calib, val_prompts, desc = calibrate_and_split(
            model, depth=depth, top_k=args.top_k, num_calibration=args.num_prompts,
            num_validation=args.num_validation_prompts, max_new_tokens=args.max_new_tokens, rows=rows, prompts=prompts,
            prompt_source=source, progress=progress,
        )  # fmt: skip
        out = Path(args.out)
        tune_and_write(
            model, calib, out.parent if str(out.parent) else Path("."), max_nodes=args.max_nodes,
            objective=args.objective, prefix_length=args.prefix_length, batch_size=args.batch_size, attn=args.attn,
            validation_prompts=val_prompts if args.num_validation_prompts else None, max_new_tokens=args.max_new_tokens,
            calibration_source=desc, out_file=out, repeats=args.latency_repeats, progress=progress,
        )  # fmt: skip
    except (HeadsLoadError, ModelLoadError, PromptError, CalibrationError, TuneError) as e:
        print(f"medusa-tune-tree: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
