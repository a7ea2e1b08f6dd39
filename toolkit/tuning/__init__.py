"""medusa_toolkit.tuning: Tree tuning: calibration, the tree search, step timing, validation, the tree stage and medusa-tune-tree."""
