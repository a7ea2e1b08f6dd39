"""Prompt sources shared by training data, tree calibration and verification, and how prompts become token ids.

Training and measurement must see prompts rendered the same way (chat template or not), otherwise acceptance measured
at verify time says little about the trained heads. Held-out prompts never overlap training prompts: the offline
chitchat set is split deterministically (`split="train"` / `"heldout"`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from medusa_toolkit.errors import ToolkitError

# A small fixed set for smoke tests and `--prompts builtin`.
BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]
HELDOUT_FRACTION = 0.1


class PromptError(ToolkitError, ValueError):
    """Prompts could not be loaded; the message names the source and the fix."""


Turn = tuple[str, str]  # (role, text), role "user" or "assistant"


def chitchat_conversations(split: str = "train") -> list[list[Turn]]:
    """The `chitchat-dataset` conversations as (role, text) turns: whoever speaks first is the user, the other speaker
    the assistant, one turn per group of consecutive messages; the last 10% (by conversation id) are held out."""
    if split not in ("train", "heldout", "all"):
        raise PromptError(f"chitchat split {split!r} is unknown; use 'train', 'heldout' or 'all'")
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise PromptError("the chitchat prompts need the 'chitchat-dataset' package: pip install chitchat-dataset")
    data = json.loads((Path(next(iter(spec.submodule_search_locations))) / "dataset.json").read_text())
    conversations = []
    for key in sorted(data):
        groups = data[key].get("messages") or []
        if not groups or not groups[0]:
            continue  # no opener
        user = groups[0][0].get("sender")  # whoever opens the conversation plays the user
        turns = []
        for group in groups:
            text = " ".join(m["text"].strip() for m in group if m.get("text", "").strip())
            if text:
                turns.append(("user" if group[0].get("sender") == user else "assistant", text))
        if turns and turns[0][0] == "user":
            conversations.append(turns)
    cut = int(len(conversations) * (1 - HELDOUT_FRACTION))
    return {"train": conversations[:cut], "heldout": conversations[cut:], "all": conversations}[split]


def chitchat_prompts(split: str = "train") -> list[str]:
    """Opening turns of the `chitchat-dataset` conversations (same split as `chitchat_conversations`)."""
    return [turns[0][1] for turns in chitchat_conversations(split)]


def user_reply_pairs(turns: list[Turn]) -> tuple[list[str], list[str]]:
    """A recorded conversation as alternating user turns and the assistant replies to them: consecutive turns of one
    role are joined by a newline, an assistant turn before the first user turn and a last unanswered user turn are
    dropped. len(users) == len(replies)."""
    merged: list[list] = []
    for role, text in turns:
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + text
        elif merged or role == "user":
            merged.append([role, text])
    if merged and merged[-1][0] == "user":
        merged.pop()
    return [t for r, t in merged if r == "user"], [t for r, t in merged if r == "assistant"]


def file_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from jsonl / json / parquet / csv (column `field`) or a .txt file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompts file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{n}: not valid JSON ({e})") from None
    elif suffix == ".json":
        rows = json.loads(path.read_text())
        if isinstance(rows, dict):
            rows = next((v for v in rows.values() if isinstance(v, list)), None)
        if not isinstance(rows, list):
            raise PromptError(f"{path}: expected a JSON list of records with a '{field}' field")
    elif suffix in (".parquet", ".csv"):
        import datasets

        rows = datasets.load_dataset(suffix[1:], data_files=str(path), split="train").to_list()
    else:
        raise PromptError(
            f"{path}: unsupported prompts file type {suffix!r}; use .jsonl, .json, .parquet, .csv or .txt"
        )
    return _field(rows, field, str(path))


def hf_prompts(name: str, field: str = "prompt", split: str = "train") -> list[str]:
    """Prompts from a Hugging Face `datasets` name (needs network or a local datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise PromptError(
            f"could not load dataset {name!r} (split {split!r}): {e}. Offline, use a local file or chitchat"
        ) from None
    return _field(ds.to_list(), field, name)


def _field(rows: list, field: str, source: str) -> list[str]:
    if rows and not isinstance(rows[0], dict):
        raise PromptError(f"{source}: records must be objects with a '{field}' field")
    if rows and field not in rows[0]:
        raise PromptError(
            f"{source}: no field '{field}' in the records (fields: {', '.join(rows[0])}); set the prompt field option"
        )
    missing = sum(1 for r in rows if not isinstance(r.get(field), str))
    if missing:
        raise PromptError(f"{source}: {missing} record(s) have no text in field '{field}'")
    return [r[field] for r in rows]


EVAL_FILE = Path(__file__).parent / "prompt_sets" / "eval.jsonl"
EVAL_DOMAINS = ("chat", "instructions", "code", "math")


def eval_prompts(domains: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, str]]:
    """The held-out evaluation set: (domain, prompt) pairs written for this repo, never used for training.

    30 prompts per domain (chat, instructions, code, math/reasoning), from none of the training sources, so tuning and
    verification on them say how the heads do on traffic unlike their training prompts.
    """
    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines() if line.strip()]
    return [(r["domain"], r["prompt"]) for r in rows if domains is None or r["domain"] in domains]


def interleave_domains(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Round-robin over domains, so any prefix of the list covers every domain about equally."""
    by_domain: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        by_domain.setdefault(pair[0], []).append(pair)
    out, queues = [], list(by_domain.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant"}


def load_conversations(path: str | None, field: str = "conversations", split: str = "train") -> list[list[Turn]]:
    """Multi-turn records (ShareGPT `conversations`: from/value, or `messages`: role/content) from a jsonl/json file or
    a `datasets` name, as (role, text) user and assistant turns (other roles, e.g. system, are dropped)."""
    if not path:
        raise PromptError("prompt source 'conversations' needs a path: a jsonl/json file or a datasets name")
    if Path(path).suffix in (".jsonl", ".json", ".parquet", ".csv") or Path(path).exists():
        file = Path(path)
        if not file.is_file():
            raise PromptError(f"conversations file not found: {path}")
        if file.suffix == ".jsonl":
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        elif file.suffix == ".json":
            rows = json.loads(file.read_text())
        else:
            import datasets

            rows = datasets.load_dataset(file.suffix[1:], data_files=str(file), split="train").to_list()
    else:
        import datasets

        try:
            rows = datasets.load_dataset(path, split=split).to_list()
        except Exception as e:
            raise PromptError(
                f"could not load dataset {path!r} (split {split!r}): {e}. Offline, use a local file"
            ) from None
    out = []
    for n, row in enumerate(rows):
        turns = row.get(field) if isinstance(row, dict) else None
        if turns is None and isinstance(row, dict):
            turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list):
            raise PromptError(f"{path}: record {n} has no list of turns in field {field!r} (ShareGPT or messages)")
        kept = []
        for t in turns:
            role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
            text = t.get("value", t.get("content", ""))
            if role and isinstance(text, str) and text.strip():
                kept.append((role, text))
        if any(role == "user" for role, _ in kept):
            out.append(kept)
    if not out:
        raise PromptError(f"{path}: no conversation with a user turn")
    return out


def load_prompts(
    source: str, path: str | None = None, field: str = "prompt", split: str = "train", num: int | None = None
) -> list[str]:
    """Prompts from `chitchat`, `builtin`, `none` (one empty prompt per sample), `file` or `hf` (with `path`).

    A `source` that is a file path is read as a file. Raises PromptError on a missing source or an empty result.
    """
    if source == "chitchat":
        prompts = chitchat_prompts("train" if split == "train" else "heldout")
    elif source == "eval":
        prompts = [p for _, p in interleave_domains(eval_prompts())]
    elif source == "builtin":
        prompts = list(BUILTIN_PROMPTS)
    elif source == "none":
        prompts = [""] * (num or 1)
    elif source == "hf":
        if not path:
            raise PromptError("prompt source 'hf' needs a dataset name (data.path)")
        prompts = hf_prompts(path, field, split)
    elif source == "file" or Path(source).suffix:
        target = path if source == "file" else source
        if not target:
            raise PromptError("prompt source 'file' needs a path (data.path)")
        prompts = file_prompts(target, field)
    else:
        raise PromptError(f"prompt source {source!r} is unknown; use chitchat, builtin, none, file (with a path) or hf")
    if num is not None:
        prompts = prompts[:num]
    if not prompts:
        raise PromptError(f"no prompts found in {path or source}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a lone surrogate from a JSON "\ud800" escape: no tokenizer takes it
            raise PromptError(
                f"prompt {i} of {path or source} is not valid text ({e.reason} at character {e.start}: "
                f"{p[max(0, e.start - 20) : e.start]!r}...); fix the file's encoding or drop that prompt"
            ) from None
    return prompts


NAMED_SOURCES = ("chitchat", "builtin", "eval", "none", "hf", "file", "self", "conversations")


def check_prompt_source(source: str, path: str | None, section: str) -> None:
    """Fail fast on a prompt source before anything loads: a file must exist, `file`/`hf` need a path."""
    key = f"{section}.sources[].source" if section == "data" else f"{section}.prompts"
    if source in ("file", "hf", "conversations") and not path:
        raise PromptError(f"{key}: {source!r} needs a path: a prompts file or a datasets name")
    is_file = source == "file" or (source == "conversations" and Path(path or "").suffix != "")
    target = path if is_file else (None if source in NAMED_SOURCES else source)
    if target is not None:
        file = Path(target).expanduser()
        if not file.is_file():
            raise PromptError(
                f"{key}: prompts file not found: {target}; pass an existing .jsonl/.json/.parquet/.csv/.txt file"
                f"{'' if section == 'data' else ' or one of builtin, chitchat, eval'}"
            )
    elif source == "chitchat" and importlib.util.find_spec("chitchat_dataset") is None:
        raise PromptError(
            f"{key}: the chitchat prompts need the 'chitchat-dataset' package: pip install chitchat-dataset"
        )


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template (its generation prompt appended or not)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def render_prompt(
    tokenizer, prompt: str, use_chat_template: bool = True, system_prompt: str | None = None
) -> list[int]:
    """Token ids for a prompt: the tokenizer's chat template (generation prompt added) when it has one, else plain text.

    An empty prompt with no template gives just BOS (unconditional sampling).
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return chat_ids(tokenizer, messages, generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    if not ids or (tokenizer.bos_token_id is not None and ids[0] != tokenizer.bos_token_id and not prompt):
        if tokenizer.bos_token_id is None:
            raise PromptError("an empty prompt needs a BOS token, and this tokenizer has none")
        ids = [tokenizer.bos_token_id] + ids
    return ids
