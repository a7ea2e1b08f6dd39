"""`medusa-verify`: prove that Medusa decoding with given heads and tree is token-identical to the base's greedy output.

Exit codes: 0 no mismatch (ties allowed unless --strict), 1 any mismatch (or a crash of Medusa decoding),
2 usage or load error, 3 --min-accept-length set and the mean accepted tokens per step is below it.
"""

from __future__ import annotations

import argparse
import sys

from medusa_toolkit.decoding import ATTN_IMPLEMENTATIONS

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-verify",
        description="Check that Medusa greedy decoding equals the base model's greedy decoding, token for token, "
        "and measure acceptance. Exit 0 pass, 1 mismatch, 2 usage/load error, 3 acceptance below --min-accept-length.",
    )
    p.add_argument("--base", required=True, help="base model: Hub id, local folder, .gguf, or smollm2-135m-instruct")
    p.add_argument("--heads", required=True, help="Medusa heads: a local folder or a Hub id ORG/NAME")
    p.add_argument(
        "--tree", default=None, help="preset (chain-N, mc_sim_7b_63) or tree.json; default: chain over all heads"
    )
    p.add_argument(
        "--prompts",
        default="builtin",
        help="chitchat (held-out split), builtin, or a .jsonl/.json/.csv/.parquet/.txt file",
    )
    p.add_argument("--prompt-field", default="prompt", help="field holding the prompt in jsonl/json/csv/parquet files")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--attn", choices=ATTN_IMPLEMENTATIONS, default="medusa_flash_decoding", help="attention of the Medusa side"
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts Medusa decodes together (batched Medusa, left padding); references run one at a time",
    )
    p.add_argument(
        "--no-chat-template", action="store_true", help="feed prompts as plain text (default: chat template)"
    )
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--report", default=None, help="write report.json here")
    p.add_argument("--junit", default=None, help="write JUnit XML here")
    p.add_argument("--strict", action="store_true", help="numerical ties fail too")
    p.add_argument(
        "--min-accept-length", type=float, default=None, help="exit 3 when mean accepted tokens/step is below"
    )
    p.add_argument("--tie-tolerance", type=float, default=None, help="logit gap counted as a tie (default per dtype)")
    p.add_argument("--no-progress", action="store_true")
    from medusa_toolkit.verify.distribution import add_sampling_arguments

    add_sampling_arguments(p)  # --sampling temperature=0.8,top_p=0.95 --samples N: the lossless-sampling check
    return p


def _fail(message: str) -> int:
    print(f"medusa-verify: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (console scripts pass it to sys.exit)."""
    args = build_parser().parse_args(argv)  # argparse exits 2 on bad usage
    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tie_tolerance is not None and args.tie_tolerance < 0:
        return _fail(f"--tie-tolerance must be >= 0, got {args.tie_tolerance}")

    # Cheap checks first, the model last.
    from medusa_toolkit.heads import HeadsLoadError
    from medusa_toolkit.medusa_model import MedusaModel, load_heads
    from medusa_toolkit.models import ModelLoadError, load_base_model
    from medusa_toolkit.prompts import PromptError, load_prompts
    from medusa_toolkit.tree import MedusaTree, TreeError
    from medusa_toolkit.verify.report import summary_table
    from medusa_toolkit.verify.verifier import _load_prompts, verify_heads, write_outputs

    try:
        prompts = _load_prompts(args.prompts, args.prompt_field, args.num_prompts, load_prompts)
        heads = load_heads(args.heads)
        tree = MedusaTree.resolve(args.tree, heads.num_heads)
        base, tokenizer = load_base_model(args.base, dtype=args.dtype, device=args.device, attn_implementation="sdpa")
        model = MedusaModel(base, heads, tokenizer)
        if args.sampling:  # distribution test of Medusa sampling instead of the greedy token-identity check
            from medusa_toolkit.verify.distribution import run_sampling_cli

            return run_sampling_cli(args, model, tokenizer, prompts)
        report = verify_heads(
            model, tokenizer, prompts, tree=tree, max_new_tokens=args.max_new_tokens, attn_implementation=args.attn,
            tie_tolerance=args.tie_tolerance, strict=args.strict, min_accept_length=args.min_accept_length,
            batch_size=args.batch_size, use_chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
            settings={"base": args.base, "heads": args.heads, "prompts_source": args.prompts},
            progress=not args.no_progress,
        )  # fmt: skip
    except (PromptError, HeadsLoadError, TreeError, ModelLoadError) as e:
        return _fail(str(e))
    except ValueError as e:  # e.g. an attention implementation transformers does not know
        return _fail(f"{e}")
    write_outputs(report, args.report, args.junit)
    print(summary_table(report))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
