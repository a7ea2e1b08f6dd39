"""Configs and run directories for tiny-model runs (no network, seconds to build); models come from `testing.tiny`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.pipeline.stages import run_pipeline
from medusa_toolkit.testing.tiny import BOS, EOS, byte_tokenizer, lookup_model_dir


def base_config(model_dir: Path, **train: Any) -> dict:
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


def permutation_run(
    root: Path,
    num: int = 48,
    new: int = 40,
    heldout: int = 8,
    seed: int = 0,
    prompt_len: int = 4,
    alphabet: int = 64,
    ragged: bool = False,
) -> tuple[Path, Path]:
    """A model whose future is predictable and the data stage's artefact of it: (model folder, run directory).

    The model (`lookup_model_dir`) continues token x with perm(x) for a fixed random permutation of the first
    `alphabet` byte tokens; every prompt is BOS and a stretch of that language (x, perm(x), ...), `prompt_len` tokens
    in all, from a different start token. The data stage (`run_pipeline(cfg, run, ["data"])`, greedy, no chat template)
    writes `num` rows of prompt + `new` answer tokens, `heldout` of them held out. Token t + 2 is perm(perm(x[t])), a
    function of the current token alone, so held-out rows (other start tokens) are learnable, while a head trained on
    the wrong shift learns perm(x[t]) and scores ~0 on the true target.

    `ragged`: the model follows one chain through the alphabet instead, and says EOS after its last token; prompts
    start at different places on it, so answers end after 1 to `new` tokens (rows of unequal lengths).
    """
    if num > alphabet - prompt_len + 2:
        raise ValueError(f"permutation_run: {num} prompts need distinct start tokens; raise alphabet or lower num")
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(alphabet, generator=g).tolist()
    if ragged:
        table = dict(zip(order, [*order[1:], EOS]))
        chains = [order[j : j + prompt_len - 1] for j in range(alphabet - prompt_len + 2)]
    else:
        table = dict(zip(order, order[1:] + order[:1]))  # one cycle: no fixed points
        chains = [[x] for x in order]
        for chain in chains:
            while len(chain) < prompt_len - 1:
                chain.append(table[chain[-1]])
    model_dir = lookup_model_dir(root / "model", table, seed)
    tokenizer = byte_tokenizer(chat_template=False)
    picks = torch.randperm(len(chains), generator=g)[:num].tolist()
    texts = [tokenizer.decode(chains[i]) for i in picks]
    for i, text in zip(picks, texts):  # the prompt must be exactly these tokens: BOS and the stretch of the language
        if tokenizer(text)["input_ids"] != [BOS, *chains[i]]:
            raise ValueError(f"permutation_run: {text!r} does not tokenize back to {chains[i]}")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    raw = base_config(model_dir)
    raw["data"] = {
        "sources": [{"source": "file", "path": str(prompts)}],
        "num_prompts": num,
        "max_new_tokens": new,
        "use_chat_template": False,
        "batch_size": num,  # one batch: the answers take `new` steps in all
        "shard_size": num,
        "eval_fraction": heldout / num,
        "max_prompt_tokens": prompt_len,
    }
    run_pipeline(config_from_dict(raw), root / "run", ["data"], log=lambda *a: None)
    return model_dir, root / "run"
