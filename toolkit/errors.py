"""The toolkit's expected failures and the one exit-code contract every command keeps.

Exit codes (README "Exit codes", docs/ci.md):
  0    ok
  1    a verified failure: Medusa output differs from the base's greedy output (MISMATCH), Medusa decoding crashed,
       or the sampling distribution test failed
  2    bad input or a load error (config, files, heads, base model, network, a refused push); one line, no traceback
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
