"""medusa_toolkit.pipeline: The pipeline's machinery: the stage runner, CLI plumbing (CONFIG + --set, exit codes), the run summary."""
