"""The toolkit's expected failures and the one exit-code contract every command keeps.

Exit codes (README "Exit codes", docs/ci.md):
  0    ok
  1    a verified failure: Medusa output differs from the base's greedy output (MISMATCH), Medusa decoding crashed,
       or the sampling distribution test failed
  2    bad input or a load error (config, files, heads, base model, network, a refused push, a run folder in use,
       a file-system error, input that does not parse); one line, no traceback
  3    the acceptance gate: mean accepted tokens per step below the required minimum
  4    an internal error: a bug in the toolkit (the traceback is printed; please report it)
  130  interrupted (Ctrl-C); the message says how to continue
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_LOW_ACCEPTANCE = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class ToolkitError(Exception):
    """A failure whose message already says what went wrong and how to fix it; commands exit with `exit_code`."""

    exit_code = EXIT_BAD_INPUT


def classify(exc: BaseException) -> tuple[int, str | None]:
    """The one mapping from an exception to the exit-code contract: (exit code, the one line to print), or
    (EXIT_INTERNAL, None) for a bug, whose traceback is printed instead.

    Our own failures carry their code (ToolkitError). What the outside world does to us is bad input or a load error
    (2), never a bug: a file system refusing a read or write (OSError: no such file, not a directory, disk full,
    permission denied) and input that does not parse (ValueError, which covers UnicodeError and JSONDecodeError).
    """
    if isinstance(exc, ToolkitError):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, None
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return EXIT_BAD_INPUT, f"{exc.strerror or exc}{where}"
    if isinstance(exc, ValueError):
        return EXIT_BAD_INPUT, f"bad input ({type(exc).__name__}): {exc}"
    return EXIT_INTERNAL, None
