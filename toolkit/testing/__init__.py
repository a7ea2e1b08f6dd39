"""medusa_toolkit.testing: helpers for testing code that uses medusa_toolkit (as torch.testing is for torch), offline and
on the CPU:

  tiny         the one builder of tiny random bases (any family), bases with fitted heads, the byte tokenizer, and
               model folders (`tiny_model_dir`, `lookup_model_dir`: a base whose greedy text is a table lookup)
  heads        heads fitted in seconds to a base's own greedy text (`greedy_corpus`, `fit_heads`, `fit_heads_on`)
  trees        random tree masks (`random_tree_mask`, `tree_depths`)
  runs         configs and run directories for tiny models (`base_config`; `permutation_run`: a data artefact the data
               stage writes from a base with a learnable permutation language)
  hub_server   a local Hub-compatible HTTP server for push tests

Nothing in the toolkit imports this package; it sits beside the jobs (train/, verify/, export/) and imports the rooms
below them, never a job (tests/test_structure.py).
"""
