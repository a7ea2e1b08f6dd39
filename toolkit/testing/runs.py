"""Data artefacts and configs for tiny-model runs (no network, seconds to build); models come from `testing.tiny`."""

from __future__ import annotations

from pathlib import Path

import torch


def write_permutation_data(
    run_dir: Path,
    num: int = 48,
    new: int = 40,
    heldout: int = 8,
    seed: int = 0,
    prompt_len: int = 4,
    alphabet: int = 64,
    ragged: bool = False,
) -> torch.Tensor:
    """Write a data artefact whose future is predictable: x[t+1] = perm(x[t]) for a fixed random permutation.

    Token t+2 is perm(perm(x[t])), a function of the current token alone, so held-out rows (other start tokens) are
    learnable, while a head trained on the wrong shift learns perm(x[t]) and scores ~0 on the true target.
    `ragged`: row i keeps only its first prompt_len + 1 + (7 * i) % new tokens (sequences of unequal lengths).
    """
    import datasets

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(alphabet, generator=g)
    tokens = torch.empty(num, prompt_len + new, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, alphabet, (num,), generator=g)
    for t in range(1, tokens.shape[1]):
        tokens[:, t] = perm[tokens[:, t - 1]]
    keep = [prompt_len + 1 + (7 * i) % new if ragged else prompt_len + new for i in range(num)]
    rows = {
        "input_ids": [row[:n] for row, n in zip(tokens.tolist(), keep)],
        "loss_mask": [([0] * prompt_len + [1] * new)[:n] for n in keep],
        "prompt_length": [prompt_len] * num,
        "prompt_index": list(range(num)),
        "heldout": [i >= num - heldout for i in range(num)],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(Path(run_dir) / "data"))
    return tokens


def base_config(model_dir: Path, **train) -> dict:
    """A raw config for the tiny model: small data and training, no wandb, no progress bars."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "heads": {"num_heads": 2, "head_type": "per_head_lm_head"},
        "data": {
            "sources": [{"source": "builtin"}],
            "num_prompts": 8,
            "max_new_tokens": 24,
            "batch_size": 4,
            "shard_size": 3,
            "eval_fraction": 0.25,
            "max_prompt_tokens": 64,
        },
        "train": {
            "micro_batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "max_steps": 10,
            "log_every": 5,
            "eval_every": 10,
            "checkpoint_every": 1000,
            **train,
        },
        "logging": {"wandb_mode": "disabled", "progress": False},
    }
