"""medusa_toolkit.decoding: the one step and loop (generate), the per-row KV cache, acceptance rules for sampling,
attention backends."""
