"""What every command shares: `CONFIG.yaml` plus `--set key=value`, flags that are shortcuts for config keys, and the
exit-code contract (medusa_toolkit.errors).

A command declares its flags as `Shortcut`s onto config keys, so `medusa-verify --num-prompts 4` and
`medusa-verify --set verify.num_prompts=4` are the same thing, with one default: the schema's. A user who wrote a
config for `medusa-train` hands the same file to `medusa-verify`, `medusa-tune-tree` and `medusa-export`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medusa_toolkit.config import ConfigError, ToolkitConfig, load_config
from medusa_toolkit.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, classify
from medusa_toolkit.run_dir import RunDir


@dataclass(frozen=True)
class Shortcut:
    """A command-line flag that sets one config key.

    `value` set: a switch (store_true) that writes this value. Otherwise the flag takes an argument of `type`
    (`choices` restricts it; `convert` maps it, e.g. `all` -> every format).
    """

    flag: str
    key: str
    help: str
    type: Callable[[str], Any] = str
    value: Any = None
    choices: tuple[str, ...] | None = None
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _schema_default(key: str) -> Any:
    node: Any = ToolkitConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def add_config_arguments(parser: argparse.ArgumentParser, shortcuts: list[Shortcut], required: bool = False) -> None:
    """CONFIG (positional), repeatable --set, and the command's shortcut flags (their help names key and default)."""
    parser.add_argument(
        "config",
        nargs=None if required else "?",
        metavar="CONFIG",
        help="YAML config (the same file medusa-train takes)" + ("" if required else "; optional"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set verify.num_prompts=4 (repeatable; values are YAML)",
    )
    for s in shortcuts:
        default = _schema_default(s.key)
        help_text = f"{s.help} [config: {s.key}; default: {default if default is not None else 'null'}]"
        if s.value is not None:
            parser.add_argument(s.flag, dest=s.dest, action="store_const", const=s.value, default=None, help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.dest, type=s.type, choices=s.choices, default=None, help=help_text)


def config_from_args(args: argparse.Namespace, shortcuts: list[Shortcut]) -> ToolkitConfig:
    """The config file (or the defaults), then --set overrides, then the shortcut flags given on the command line."""
    values, flags = {}, {}
    for s in shortcuts:
        value = getattr(args, s.dest, None)
        if value is not None:
            values[s.key] = s.convert(value) if s.convert is not None else value
            flags[s.key] = s.flag
    try:
        cfg = load_config(args.config, list(args.overrides), values)
    except ConfigError as e:  # name the flag the user typed, not only the key it sets
        message = str(e)
        for key, flag in flags.items():
            message = message.replace(f"config key '{key}': ", f"{flag} ({key}) ")
        raise ConfigError(message) from None
    from medusa_toolkit.model.base_model import check_device

    check_device(cfg.model.device)  # `--device cuda` on a CPU machine: before anything loads
    return cfg


def output_dir(args: argparse.Namespace, cfg: ToolkitConfig) -> RunDir | None:
    """The run directory when a CONFIG was given (the standalone commands then default to its artefacts)."""
    return RunDir(cfg.output_dir) if args.config else None


def heads_argument(args: argparse.Namespace, cfg: ToolkitConfig, verb: str) -> str:
    """--heads, else the CONFIG run's OUTPUT_DIR/heads; with neither, a ConfigError saying so."""
    run = output_dir(args, cfg)
    if args.heads:
        return args.heads
    if run is None:
        raise ConfigError(f"--heads is required (or pass the CONFIG of a run: its OUTPUT_DIR/heads are {verb})")
    return str(run.heads)


def require_base(args: argparse.Namespace) -> None:
    """The standalone commands need the base: --base, or the CONFIG whose model.name_or_path names it."""
    if args.config is None and getattr(args, "base", None) is None:
        raise ConfigError("--base is required (or pass the CONFIG of a run, whose model.name_or_path is the base)")


def run_command(prog: str, body: Callable[[], int], interrupted_hint: str = "nothing was written") -> int:
    """Run a command's body under the exit-code contract (`errors.classify`): a ToolkitError, a file-system error or
    unparsable input -> one line and its code (2 unless the error says otherwise), Ctrl-C -> 130 with one line, a
    bug -> its traceback and 4. MEDUSA_TOOLKIT_DEBUG=1 prints the traceback of the one-line errors too."""
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as e:  # KeyboardInterrupt included
        code, line = classify(e)
        if code == EXIT_INTERRUPTED:
            print(f"\n{prog}: interrupted; {interrupted_hint}", file=sys.stderr)
        elif line is not None:
            if os.environ.get("MEDUSA_TOOLKIT_DEBUG"):
                traceback.print_exc()
            print(f"{prog}: error: {line}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(
                f"{prog}: internal error (exit {EXIT_INTERNAL}): this is a bug in medusa-toolkit; please report the "
                "traceback above",
                file=sys.stderr,
            )
        return code
