"""medusa_toolkit.testing: helpers for testing code that uses medusa_toolkit (as torch.testing is for torch), offline and
on the CPU: tiny random bases with fitted heads and model folders (`tiny`), configs and run directories for them
(`runs`), random tree masks (`trees`), and a local Hub-compatible server (`hub_server`).

Nothing in the toolkit imports this package; it sits beside the jobs (train/, verify/, export/) and imports the rooms
below it, never a job.
"""
