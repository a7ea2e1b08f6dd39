"""medusa_toolkit.tuning: tree tuning — calibration, the tree search, step timing, validation by decoding, the tree
stage and medusa-tune-tree."""

from medusa_toolkit.errors import ToolkitError


class TuneError(ToolkitError, ValueError):
    """Tree tuning cannot run; the message names the problem and the fix."""
