"""Prompt sources -> conversations: every configured source's share of data.num_prompts, as the user turns the base
answers (one for a plain prompt, several for a multi-turn record), and what each source gave."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from medusa_toolkit import distributed as D
from medusa_toolkit import special_tokens
from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.prompts import (
    PromptError,
    chitchat_conversations,
    load_conversations,
    load_prompts,
    user_reply_pairs,
)
from medusa_toolkit.train.data import DataError


@dataclass
class Conversation:
    """The user turns of one conversation; the base writes every assistant turn itself, unless `replies` holds the
    recorded assistant turns to keep (a source with `regenerate: false`)."""

    users: list[str]
    source: str
    replies: list[str] | None = None


def source_counts(weights: list[float], total: int) -> list[int]:
    """Split `total` prompts over sources by weight (largest remainder: the counts sum to `total` exactly)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def load_sources(cfg: ToolkitConfig, model, tokenizer, fits) -> tuple[list[Conversation], list[dict]]:
    """Every configured source's share of data.num_prompts, as conversations, and what each source gave."""
    d = cfg.data
    counts = source_counts([src.weight for src in d.sources], d.num_prompts)
    conversations, report = [], []
    writers = 0  # self sources so far: each writes from its own seed, so two alike still write different prompts
    for src, count in zip(d.sources, counts):
        entry = {"source": src.source, "path": src.path, "weight": src.weight, "requested": count}
        replies: list = [None] * count
        try:
            if src.source == "self":
                from medusa_toolkit.train.data import self_prompts

                bar = tqdm(total=count, unit="prompt", desc="data: self-written prompts",
                           disable=not D.is_main() or not cfg.logging.progress)  # fmt: skip
                sampling = {"temperature": src.temperature, "top_p": src.top_p, "max_tokens": src.max_tokens}
                writer_system = d.system_prompt if src.system_prompt is None else src.system_prompt
                seed, writers = d.seed + 1_000 * writers, writers + 1
                how = self_prompts.PromptSampling(
                    writer_system, **sampling, batch_size=max(d.batch_size, 16), seed=seed, fits=fits,
                    progress=lambda kept, bar=bar: bar.update(kept - bar.n),
                )  # fmt: skip
                if d.engine == "openai":  # the server holds the weights; `model` here is only the base's configs
                    from medusa_toolkit.train.data.openai_client import OpenAIClient

                    writer = OpenAIClient(cfg, tokenizer, special_tokens.eos_ids(model), model.config.vocab_size)
                    texts, entry["self_prompts"] = self_prompts.write_with_server(writer, tokenizer, count, how)
                    entry["written_by"] = {**writer.describe(), "requests": writer.stats.requests,
                                           "retries": writer.stats.retries, "seed_sent": "seed" not in writer.refused}  # fmt: skip
                else:
                    # Rows leave the writer's batch as their turn ends, so it runs mostly part-empty: twice the
                    # generation batch keeps it busy (SmolLM2 on 2 CPU cores: 233 vs 308 ms per prompt at 64 vs 32).
                    how = replace(how, batch_size=max(2 * d.batch_size, 16))
                    texts, entry["self_prompts"] = self_prompts.write(model, tokenizer, count, how)
                    entry["written_by"] = {"engine": "hf", "batch_size": how.batch_size}
                entry["written_by"]["sampling"] = {**sampling, "seed": seed, "system_prompt": writer_system}
                bar.close()
                turns = [[t] for t in texts]
            elif not src.regenerate:  # recorded conversations kept as they are (config checks: chitchat or file)
                if src.source == "chitchat":
                    recorded = chitchat_conversations("train" if src.split == "train" else "heldout")
                else:
                    recorded = load_conversations(src.path, src.field, src.split)
                pairs = [p for p in map(user_reply_pairs, recorded) if p[0]]
                turns, replies = [u for u, _ in pairs], [r for _, r in pairs]
            elif src.source == "conversations":
                recorded = load_conversations(src.path, src.field, src.split)
                turns = [[text for role, text in c if role == "user"] for c in recorded]
            else:
                turns = [[t] for t in load_prompts(src.source, src.path, src.field, src.split, num=count)]
        except PromptError as e:
            raise DataError(f"data stage: {e}") from None
        entry["available"], entry["taken"] = len(turns), min(count, len(turns))
        if not src.regenerate:
            entry["regenerate"] = False
        # Recorded rows carry their own tag, so the summary and later subsets tell them from regenerated ones.
        tag = src.source if src.regenerate else f"{src.source}:recorded"
        conversations += [
            Conversation(t, tag, None if src.regenerate else r) for t, r in zip(turns[:count], replies[:count])
        ]
        report.append(entry)
    return conversations, report
