"""medusa_toolkit.train.data: the data stage — prompt sources, self-written prompts, the base's answers (in-process or
from an OpenAI-compatible server), shards and the merged data artefact."""

from medusa_toolkit.errors import ToolkitError


class DataError(ToolkitError, ValueError):
    """The data stage cannot produce training data; the message names the problem and the fix."""
