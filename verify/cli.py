"""`medusa-verify [CONFIG] [flags]`: prove that Medusa decoding with given heads and tree is token-identical to the
base's greedy output.

Every flag is a shortcut for a config key (`--num-prompts` is `verify.num_prompts`), so the config written for
`medusa-train` works here too: `medusa-verify configs/smollm2-135m.yaml` verifies that run's heads and tree.
Exit codes: 0 pass (ties allowed unless --strict), 1 a mismatch or a crash of Medusa decoding (or the sampling check
failed), 2 bad input or load error, 3 mean accepted tokens per step below --min-accept-length, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from medusa_toolkit.config import ATTN_IMPLEMENTATIONS, ConfigError
from medusa_toolkit.pipeline.cli import (
    Shortcut,
    add_config_arguments,
    config_from_args,
    heads_argument,
    output_dir,
    require_base,
    run_command,
)

DTYPES = ("float32", "bfloat16", "float16")

SHORTCUTS = [
    Shortcut("--base", "model.name_or_path", "base model: Hub id, local folder, .gguf, or smollm2-135m-instruct"),
    Shortcut("--tree", "verify.tree", "preset (chain-N, mc_sim_7b_63) or tree.json; null: the run's tuned tree, "
             "else tree.tree, else a chain over all heads"),
    Shortcut("--prompts", "verify.prompts", "chitchat (held-out split), builtin, or a .jsonl/.json/.csv/.parquet/.txt"),
    Shortcut("--prompt-field", "verify.prompt_field", "field holding the prompt in jsonl/json/csv/parquet files"),
    Shortcut("--num-prompts", "verify.num_prompts", "prompts checked (null: all of a file, 8 of a named set)", int),
    Shortcut("--max-new-tokens", "verify.max_new_tokens", "tokens generated per prompt by both sides", int),
    Shortcut("--dtype", "verify.dtype", "dtype of both sides (null: model.dtype)", choices=DTYPES),
    Shortcut("--attn", "verify.attn_implementation", "attention of the Medusa side", choices=ATTN_IMPLEMENTATIONS),
    Shortcut("--reference", "verify.reference", "what Medusa is compared with: same_path (the base's greedy on the "
             "same forward) or generate (transformers generate())", choices=("same_path", "generate")),
    Shortcut("--compile", "model.compile", "compile the decoding step (auto, on, off)", choices=("auto", "on", "off")),
    Shortcut("--device", "model.device", "cuda / cpu (null: cuda when available)"),
    Shortcut("--batch-size", "verify.batch_size", "prompts Medusa decodes together (references run one at a time)",
             int),
    Shortcut("--no-chat-template", "data.use_chat_template", "feed prompts as plain text", value=False),
    Shortcut("--system-prompt", "data.system_prompt", "system message for the chat template"),
    Shortcut("--strict", "verify.strict", "numerical ties fail too", value=True),
    Shortcut("--min-accept-length", "verify.min_accept_length", "exit 3 when mean accepted tokens/step is below",
             float),
    Shortcut("--tie-tolerance", "verify.tie_tolerance", "logit gap counted as a tie (null: per dtype)", float),
    Shortcut("--no-progress", "logging.progress", "hide progress bars", value=False),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-verify",
        description="Check that Medusa greedy decoding equals the base model's greedy decoding, token for token, "
        "and measure acceptance. Exit 0 pass, 1 mismatch, 2 bad input or load error, 3 acceptance below "
        "--min-accept-length, 130 interrupted.",
    )
    add_config_arguments(p, SHORTCUTS)
    p.add_argument("--heads", default=None, help="Medusa heads: a folder or a Hub id ORG/NAME (default with a "
                   "CONFIG: OUTPUT_DIR/heads)")  # fmt: skip
    p.add_argument("--report", default=None, help="write report.json here")
    p.add_argument("--junit", default=None, help="write JUnit XML here")
    from medusa_toolkit.verify.sampling_check import add_sampling_arguments

    add_sampling_arguments(p)  # --sampling temperature=0.8,top_p=0.95 --samples N: the lossless-sampling check
    return p


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits 2 on bad usage
    cfg = config_from_args(args, SHORTCUTS)
    heads = heads_argument(args, cfg, "verified")
    require_base(args)
    if args.sampling:
        from medusa_toolkit.verify.sampling_check import parse_sampling_spec

        try:
            parse_sampling_spec(args.sampling)  # a bad spec fails before any model loads
        except ValueError as e:
            raise ConfigError(str(e)) from None

    from medusa_toolkit.verify.report import summary_table
    from medusa_toolkit.verify.verifier import VerifyRequest, write_outputs

    request = VerifyRequest.from_config(cfg, heads, output_dir(args, cfg))
    model, tree = request.load()
    if args.sampling:  # distribution test of Medusa sampling instead of the greedy token-identity check
        from medusa_toolkit.prompts import render_prompt
        from medusa_toolkit.verify.sampling_check import run_sampling_cli

        prompts, _ = request.prompts()
        ids = [render_prompt(model.tokenizer, p, cfg.data.use_chat_template, cfg.data.system_prompt) for p in prompts]
        return run_sampling_cli(args, model, ids, tree, cfg.verify.attn_implementation, cfg.logging.progress)
    report = request.run_greedy(model, tree)
    write_outputs(report, args.report, args.junit)
    print(summary_table(report))
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (console scripts pass it to sys.exit)."""
    return run_command("medusa-verify", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
