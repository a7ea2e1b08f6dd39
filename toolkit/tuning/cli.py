"""`medusa-tune-tree [CONFIG] [flags]`: choose a Medusa tree for given heads from measured acceptance and latency.

Every flag but the paths is a shortcut for a config key (`--max-nodes` is `tree.max_nodes`), so a `medusa-train`
config works here too: `medusa-tune-tree configs/x.yaml` tunes that run's heads on its held-out data. Exit codes: 0 ok,
2 bad input or load error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
from medusa_toolkit.run_dir import TREE_FILE, locked

SHORTCUTS = [
    Shortcut("--base", "model.name_or_path", "base model: Hub id, local folder, .gguf, or smollm2-135m-instruct"),
    Shortcut("--prompts", "tree.prompts", "calibration prompts when there are no data rows: chitchat, builtin or a "
             "prompts file"),
    Shortcut("--prompt-field", "tree.prompt_field", "field holding the prompt text in jsonl/json/csv/parquet"),
    Shortcut("--calibrate-on", "tree.calibrate_on", "data (held-out data rows when there are some) or prompts",
             choices=("data", "prompts")),  # fmt: skip
    Shortcut("--max-nodes", "tree.max_nodes", "largest tree to consider, root included", int),
    Shortcut("--max-depth", "tree.max_depth", "deepest path (null: the number of heads)", int),
    Shortcut("--top-k", "tree.top_k", "candidates per head considered", int),
    Shortcut("--objective", "tree.objective", "speed or acceptance", choices=("speed", "acceptance")),
    Shortcut("--num-prompts", "tree.num_calibration_prompts", "calibration prompts/rows", int),
    Shortcut("--num-validation-prompts", "tree.num_validation_prompts", "prompts decoded to check (0: skip)", int),
    Shortcut("--max-new-tokens", "tree.calibration_max_new_tokens", "greedy tokens per prompt", int),
    Shortcut("--prefix-length", "tree.prefix_length", "KV-cache length at which steps are timed", int),
    Shortcut("--batch-size", "tree.batch_size", "batch size at which steps are timed", int),
    Shortcut("--latency-repeats", "tree.latency_repeats", "timed repeats per budget (median used)", int),
    Shortcut("--latency-profile", "tree.latency_profile", "tune for the step times of a profile measured on another "
             "machine (--profile-latency there) instead of timing here"),
    Shortcut("--compile", "model.compile", "compile the decoding step (auto, on, off)", choices=("auto", "on", "off")),
    Shortcut("--dtype", "model.dtype", "dtype of the base", choices=("float32", "bfloat16", "float16")),
    Shortcut("--device", "model.device", "cpu, cuda, cuda:1 ... (null: CUDA when available)"),
    Shortcut("--attn", "model.attn_implementation", "attention for decoding",
             choices=ATTN_IMPLEMENTATIONS),
    Shortcut("--no-chat-template", "data.use_chat_template", "render prompts as plain text", value=False),
    Shortcut("--no-progress", "logging.progress", "hide progress bars", value=False),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-tune-tree",
        description="Tune the Medusa tree: calibrate joint head acceptance on held-out text, time decoding steps on "
        "this device, pick the tree with the best predicted tokens/s (or accepted length), check it by decoding.",
    )
    add_config_arguments(p, SHORTCUTS)
    p.add_argument("--heads", help="heads folder or Hub id (default with a CONFIG: OUTPUT_DIR/heads)")
    p.add_argument("--data", help="data-stage folder whose held-out rows calibrate (default with a CONFIG: "
                   "OUTPUT_DIR/data when it exists; a split-less dataset is used whole, with a warning)")  # fmt: skip
    p.add_argument("--out", help="tree.json to write; plots go next to it (default: OUTPUT_DIR/tree/tree.json with "
                   "a CONFIG, else ./tree.json)")  # fmt: skip
    p.add_argument("--profile-latency", metavar="OUT.json", help="only measure this machine's step time per node "
                   "budget for these heads and base, and write it as a latency profile (tree.latency_profile on "
                   "another machine tunes for this one); no tree is chosen")  # fmt: skip
    return p


def run(argv: list[str] | None) -> int:
    from medusa_toolkit.tuning.stage import profile_from_config, tune_from_config

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, SHORTCUTS)
    heads, run = heads_argument(args, cfg, "tuned"), output_dir(args, cfg)
    require_base(args)
    if args.profile_latency:
        profile_from_config(cfg, heads, Path(args.profile_latency))
        return 0
    if cfg.tree.latency_profile:
        from medusa_toolkit.decoding.latency_profile import LatencyProfile

        LatencyProfile.load(Path(cfg.tree.latency_profile).expanduser())  # a bad file fails before any model loads
    data = Path(args.data) if args.data else (run.data if run else None)
    if args.data and not data.is_dir():
        raise ConfigError(f"--data: data dir not found: {args.data}")
    if args.prompts and not args.data:
        data = None  # prompts were asked for explicitly
    out = Path(args.out) if args.out else (run.tree_file if run else Path(TREE_FILE))
    with locked(run if not args.out else None, "medusa-tune-tree"):  # it writes into the run's tree/
        tune_from_config(cfg, heads, out, data, allow_train=bool(args.data))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("medusa-tune-tree", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
