"""The one base class of the toolkit's expected failures (bad input, missing artefacts, refused pushes).

Commands print these as one clear message and exit non-zero; anything else is a bug and keeps its traceback.
"""


class ToolkitError(Exception):
    """A failure whose message already says what went wrong and how to fix it."""
