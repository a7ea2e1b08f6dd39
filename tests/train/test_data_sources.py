"""Data diversity: self-generated prompts (seeded, deduplicated, filtered with counted reasons), mixed sources by
weight, multi-turn conversations whose every assistant turn is the base's own output, and the held-out eval set."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from medusa_toolkit.config import ConfigError, config_from_dict
from medusa_toolkit.pipeline.stages import run_pipeline
from medusa_toolkit.prompts import EVAL_DOMAINS, eval_prompts, interleave_domains
from medusa_toolkit.testing.runs import base_config
from medusa_toolkit.testing.tiny import BYTE_VOCAB, EOS, byte_tokenizer, tiny_base, tiny_model_dir
from medusa_toolkit.train.data import self_prompts, sources
from medusa_toolkit.train.data import stage as data_mod
from medusa_toolkit.train.data.self_prompts import PromptSampling, SelfPromptError, pre_query_ids

CHAT_WITH_EOS = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def ascii_talker(seed: int = 0, eos_bias: float = 2.0):
    """A tiny base that writes lower-case words and ends its turn (EOS) now and then, with its byte tokenizer: a chat
    model small enough for a test, whose text round-trips through the tokenizer exactly."""
    tok = byte_tokenizer()
    tok.chat_template = CHAT_WITH_EOS
    base = tiny_base("llama", seed, vocab=BYTE_VOCAB, eos=EOS)
    allowed = tok.convert_tokens_to_ids(list("abcdefghij") + ["Ġ"]) + [EOS]  # Ġ: the byte-level space
    head = torch.nn.Linear(64, BYTE_VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight * 4)
        head.bias.fill_(-1e4)
        head.bias[allowed] = 0.0
        head.bias[EOS] = eos_bias
    base.lm_head = head
    return base, tok


def test_self_prompts_are_seeded_deduplicated_and_every_drop_is_counted():
    base, tok = ascii_talker(eos_bias=-1.0)
    kw = {"system_prompt": None, "temperature": 1.0, "top_p": 1.0, "max_tokens": 48, "batch_size": 8,
          "fits": lambda text: len(text) <= 60}  # fmt: skip
    a, counts = self_prompts.write(base, tok, 6, PromptSampling(seed=1, **kw))
    b, again = self_prompts.write(base, tok, 6, PromptSampling(seed=1, **kw))
    c, _ = self_prompts.write(base, tok, 6, PromptSampling(seed=2, **kw))
    assert a == b and counts == again and a != c  # deterministic for a seed, different for another
    assert counts["sampled"] == counts["kept"] + sum(v for k, v in counts.items() if k not in ("sampled", "kept"))
    assert len(a) == counts["kept"] <= 6 and len(set(a)) == len(a)
    assert a and all(len(p.split()) >= 3 and len(p) <= 60 for p in a)
    assert counts["too_short"] + counts["too_long"] + counts["unfinished"] > 0  # the filters really ran


def test_self_prompt_filters_on_scripted_outputs(monkeypatch):
    """Exact and near duplicates, empty, short and unfinished outputs are each dropped and counted."""

    tok = byte_tokenizer()
    texts = ["plan a trip to the sea", "Plan a  trip to the SEA!", "plan a trip to the sea please", "hi", "",
             "write a python function that sorts", None]  # fmt: skip

    def scripted(model, prefix, rows, max_tokens, *args):
        assert prefix == pre_query_ids(tok, None) and rows == len(texts) and max_tokens == 40
        # The last row never ends its turn.
        return [(tok(t, add_special_tokens=False)["input_ids"], True) if t is not None else ([97] * 40, False)
                for t in texts]  # fmt: skip

    monkeypatch.setattr(self_prompts, "sample_turns", scripted)
    how = PromptSampling(system_prompt=None, temperature=1.0, top_p=1.0, max_tokens=40, batch_size=len(texts), seed=0,
                         fits=lambda t: True)  # fmt: skip
    kept, counts = self_prompts.write(None, tok, 10, how)
    assert kept == ["plan a trip to the sea", "write a python function that sorts"]
    # 6 rounds of the same 7 outputs (10 prompts asked, at most 4x that sampled): after round 1 every keeper repeats.
    assert counts["sampled"] == 42 and counts["kept"] == 2
    assert (counts["duplicate"], counts["near_duplicate"], counts["too_short"], counts["empty"], counts["unfinished"]) \
        == (1 + 5 * 3, 6, 6, 6, 6)  # fmt: skip


def test_the_last_round_samples_what_the_keep_rate_says_is_needed(monkeypatch):
    """Once a round has kept most of its rows, the next one is sized to the prompts still missing (plus a margin), not
    a whole batch of which most would be counted as surplus."""

    tok = byte_tokenizer()
    rows_asked = []

    def scripted(model, prefix, rows, max_tokens, temperature, top_p, eos, seed):
        rows_asked.append(rows)
        words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]
        # Row i of round r: three distinct words, so every prompt is kept (no duplicates), except row 0 is unfinished.
        texts = [f"{words[(seed + i) % 11]} {words[(3 * seed + i) % 11]} {seed} {i}" for i in range(rows)]
        return [(tok(t, add_special_tokens=False)["input_ids"], i > 0) for i, t in enumerate(texts)]

    monkeypatch.setattr(self_prompts, "sample_turns", scripted)
    how = PromptSampling(system_prompt=None, temperature=1.0, top_p=1.0, max_tokens=40, batch_size=8, seed=0,
                         fits=lambda t: True)  # fmt: skip
    kept, counts = self_prompts.write(None, tok, 10, how)
    # Round 1 keeps 7 of 8; 3 missing at that rate -> ceil(3 * 8 / 7 * 1.2) = 5 rows, not 8.
    assert rows_asked == [8, 5] and len(kept) == 10
    assert counts == {**counts, "sampled": 13, "kept": 10, "unfinished": 2, "surplus": 1}
    assert (
        self_prompts.round_size(8, 10, 0, 0) == 8 and self_prompts.round_size(8, 100, 7, 8) == 8
    )  # nothing kept / far to go


def test_nucleus_is_generates_top_p_even_when_it_outgrows_the_candidates(monkeypatch):
    """The tokens the sampler can return are exactly those TopPLogitsWarper keeps, for rows whose nucleus fits in
    the candidates and for rows (flat distributions) that need the whole vocabulary; and it returns nothing else."""
    from transformers import TopPLogitsWarper

    monkeypatch.setattr(self_prompts, "NUCLEUS_CANDIDATES", 16)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g) * torch.tensor([[8.0], [4.0], [0.5], [0.1]])  # peaked ... flat
    for top_p, temperature in ((0.9, 1.0), (0.5, 0.7), (0.999, 1.3)):
        warped = TopPLogitsWarper(top_p)(None, logits / temperature)
        expected = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in warped]
        assert len(expected[0]) < 16 < len(expected[3])  # both paths are exercised
        probs, index = self_prompts.nucleus(logits, temperature, top_p)
        assert [set(i[p > 0].tolist()) for p, i in zip(probs, index)] == expected
        for u in torch.linspace(0, 0.9999, 200):
            tokens = self_prompts.nucleus_sample(logits, temperature, top_p, u.repeat(4)).tolist()
            assert all(t in nucleus for t, nucleus in zip(tokens, expected))
        most_likely = logits.argmax(-1).tolist()
        assert self_prompts.nucleus_sample(logits, temperature, top_p, torch.zeros(4)).tolist() == most_likely


def test_sample_turns_equal_row_by_row_sampling_without_a_cache(monkeypatch):
    """Every row of the batched, cached loop (shared prefix run once, finished rows dropped) is the row sampled alone
    by full forwards from the same uniform numbers; and finished rows really leave the batch."""

    base, tok = ascii_talker(eos_bias=1.0)
    prefix, rows, max_tokens, eos = pre_query_ids(tok, None), 6, 24, {EOS}
    widths = []
    real_forward = base.forward
    monkeypatch.setattr(base, "forward", lambda *a, **k: widths.append(len(k.get("input_ids", a[0] if a else None)))
                        or real_forward(*a, **k))  # fmt: skip
    turns = self_prompts.sample_turns(base, prefix, rows, max_tokens, 0.9, 0.8, eos, seed=5)
    assert widths[0] == 1 and widths[1] == rows and widths[-1] < rows  # the prefix once; then the batch shrinks
    assert any(done for _, done in turns) and any(len(t) > 3 for t, _ in turns)
    g = torch.Generator().manual_seed(5)
    uniforms = [torch.rand(rows, generator=g) for _ in range(max_tokens)]
    for row, (tokens, done) in enumerate(turns):
        ids, expected_done = list(prefix), False
        for step in range(max_tokens):
            with torch.no_grad():
                logits = real_forward(torch.tensor([ids])).logits[:, -1]
            token = int(self_prompts.nucleus_sample(logits, 0.9, 0.8, uniforms[step][row : row + 1])[0])
            if token in eos:
                expected_done = True
                break
            ids.append(token)
        assert (ids[len(prefix) :], expected_done) == (tokens, done), f"row {row}"


def test_self_prompts_need_a_chat_template():
    with pytest.raises(SelfPromptError, match="chat template.*chitchat, file, hf, conversations"):
        pre_query_ids(byte_tokenizer(chat_template=False), None)


def test_no_prompt_kept_says_why_not_to_raise_the_prompt_length(tmp_path, monkeypatch):
    """Every self-written prompt dropped: the error names the source and its drop reasons, not max_prompt_tokens."""

    base, tok = ascii_talker()
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(data_mod, "load_base_model", lambda *a, **k: (base, tok))
    counts = {"sampled": 8, "kept": 0, "unfinished": 6, "too_short": 2}
    monkeypatch.setattr(self_prompts, "write", lambda *a, **k: ([], counts))
    raw = base_config(model_dir)
    raw["data"]["sources"] = [{"source": "self"}]
    with pytest.raises(
        data_mod.DataError, match=r"gave no prompts \(self: 0 of 8, sampled 8, unfinished 6, too_short 2\)"
    ) as e:
        run_pipeline(config_from_dict(raw), tmp_path / "run", ["data"])
    assert "max_prompt_tokens" not in str(e.value)


def test_self_sources_steered_by_their_own_system_prompt(tmp_path, monkeypatch):
    """A self source's system_prompt is what the model sees while writing its prompts, never what the answers are
    generated and trained with (data.system_prompt, as served); two self sources write from different seeds."""

    base, tok = ascii_talker(eos_bias=-1.0)
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(data_mod, "load_base_model", lambda *a, **k: (base, tok))
    seen = []
    real = self_prompts.write

    def spy(model, tokenizer, count, how):
        seen.append((how.system_prompt, how.seed))
        return real(model, tokenizer, count, how)

    monkeypatch.setattr(self_prompts, "write", spy)
    raw = base_config(model_dir)
    raw["data"].update(sources=[{"source": "self", "max_tokens": 48}, {"source": "self", "max_tokens": 48,
                       "system_prompt": "you write about bees"}], num_prompts=6, max_new_tokens=4, eval_fraction=0.0,
                       max_prompt_tokens=128, system_prompt="served")  # fmt: skip
    run_pipeline(config_from_dict(raw), tmp_path / "run", ["data"])
    assert seen == [("served", 0), ("you write about bees", 1000)]
    summary = json.loads((tmp_path / "run" / "data" / "data_summary.json").read_text())
    steering = [s["written_by"]["sampling"]["system_prompt"] for s in summary["sources"]]
    assert steering == ["served", "you write about bees"]
    rows = list(datasets.load_from_disk(str(tmp_path / "run" / "data")))
    assert len(rows) >= 4
    for row in rows:
        prompt = tok.decode(row["input_ids"][: row["prompt_length"]])
        assert prompt.startswith("<|system|>served<|user|>") and "bees" not in prompt
    with pytest.raises(ConfigError, match="system_prompt steers the prompts the model writes itself"):
        raw["data"]["sources"] = [{"source": "builtin", "system_prompt": "x"}]
        run_pipeline(config_from_dict(raw), tmp_path / "run2", ["data"])


def test_mixed_sources_honour_their_weights(tmp_path):
    assert sources.source_counts([3.0, 1.0], 8) == [6, 2]
    assert sources.source_counts([1.0, 1.0, 1.0], 10) == [4, 3, 3] and sum(sources.source_counts([0.3, 0.7], 7)) == 7
    model_dir = tiny_model_dir(tmp_path / "model")
    prompts = tmp_path / "mine.txt"
    prompts.write_text("".join(f"my prompt {i}\n" for i in range(20)))
    raw = base_config(model_dir)
    raw["data"].update(sources=[{"source": "builtin", "weight": 1}, {"source": "file", "path": str(prompts), "weight": 3}],
                       num_prompts=8, max_prompt_tokens=128, max_new_tokens=8)  # fmt: skip
    run_pipeline(config_from_dict(raw), tmp_path / "run", ["data"])
    summary = json.loads((tmp_path / "run" / "data" / "data_summary.json").read_text())
    taken = {s["source"]: (s["requested"], s["taken"]) for s in summary["sources"]}
    assert taken == {"builtin": (2, 2), "file": (6, 6)}
    assert summary["sequences_per_source"] == {"builtin": 2, "file": 6}


def test_multi_turn_conversations_are_regenerated_turn_by_turn(tmp_path, monkeypatch):
    base, tok = ascii_talker(seed=3, eos_bias=-1.0)
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)  # for the config checks; the stage gets the in-memory model (its lm_head bias
    tok.save_pretrained(model_dir)  # keeps the text ASCII, and a Llama checkpoint has no slot for it)
    monkeypatch.setattr(data_mod, "load_base_model", lambda *a, **k: (base, tok))
    convs = tmp_path / "sharegpt.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": "abc def"}, {"from": "gpt", "value": "IGNORED"},
                           {"from": "human", "value": "ghi jab"}, {"from": "gpt", "value": "IGNORED"}]},
        {"messages": [{"role": "user", "content": "bad cafe"}, {"role": "assistant", "content": "IGNORED"}]},
    ]  # fmt: skip
    convs.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = base_config(model_dir)
    raw["data"].update(sources=[{"source": "conversations", "path": str(convs), "field": "conversations"}],
                       num_prompts=2, max_new_tokens=12, eval_fraction=0.0)  # fmt: skip
    cfg = config_from_dict(raw)
    run_pipeline(cfg, tmp_path / "run", ["data"])
    ds = datasets.load_from_disk(str(tmp_path / "run" / "data"))
    rows = {r["prompt_index"]: r for r in ds}
    assert rows[0]["turns"] == 2 and rows[1]["turns"] == 1
    model = base  # the reference: generate() per turn on the context the stage built
    for index, users in ((0, ["abc def", "ghi jab"]), (1, ["bad cafe"])):
        row, replies, pos = rows[index], [], 0
        for turn in range(len(users)):
            convo = sources.Conversation(users, "conversations")
            context = data_mod.render_turns(tok, cfg, convo, replies)
            assert row["input_ids"][: len(context)] == context  # the structure: template, user turns, own replies
            with torch.no_grad():
                ref = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=12, eos_token_id=EOS,
                                     pad_token_id=0)[0, len(context) :].tolist()  # fmt: skip
            ref = ref[: ref.index(EOS) + 1] if EOS in ref else ref
            reply = row["input_ids"][len(context) : len(context) + len(ref)]
            assert reply == ref, f"conversation {index} turn {turn}: not the base's own greedy reply"
            assert all(row["loss_mask"][len(context) : len(context) + len(ref)])  # every reply is trained on
            assert not any(row["loss_mask"][pos : len(context)])  # template and user turns are not
            assert "IGNORED" not in tok.decode(row["input_ids"])
            replies.append(tok.decode(ref, skip_special_tokens=True))
            pos = len(context) + len(ref)
        assert len(row["input_ids"]) == pos
    summary = json.loads((tmp_path / "run" / "data" / "data_summary.json").read_text())
    assert summary["turns_regenerated"] == 3 and summary["retokenization_mismatches"] == 0


def test_recorded_conversations_keep_their_text_and_learn_the_base_argmax(tmp_path, monkeypatch):
    """regenerate: false keeps the recorded turns, runs no generation, masks exactly the assistant turns, and labels
    each position with the base's greedy next token after the recorded prefix (token ids, against unpadded forwards);
    the trainer's targets are those labels."""
    base, tok = ascii_talker(seed=3, eos_bias=-1.0)
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(data_mod, "load_base_model", lambda *a, **k: (base, tok))
    monkeypatch.setattr(data_mod, "generate_batch", lambda *a, **k: pytest.fail("regenerate: false must not generate"))
    convs = tmp_path / "sharegpt.jsonl"
    records = [
        {"conversations": [{"from": "gpt", "value": "dropped: no user before it"}, {"from": "human", "value": "abc"},
                           {"from": "gpt", "value": "KEPT one"}, {"from": "human", "value": "def"},
                           {"from": "gpt", "value": "KEPT two"}, {"from": "human", "value": "unanswered"}]},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "ghi"},
                      {"role": "assistant", "content": "KEPT three, longer than the others"}]},
    ]  # fmt: skip
    convs.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = base_config(model_dir)
    raw["data"].update(sources=[{"source": "conversations", "path": str(convs), "regenerate": False}], num_prompts=2,
                       eval_fraction=0.0)  # fmt: skip
    cfg = config_from_dict(raw)
    run_pipeline(cfg, tmp_path / "run", ["data"])
    rows = {r["prompt_index"]: r for r in datasets.load_from_disk(str(tmp_path / "run" / "data"))}
    expected = {0: (["abc", "def"], ["KEPT one", "KEPT two"]), 1: (["ghi"], ["KEPT three, longer than the others"])}
    for index, (users, replies) in expected.items():
        row, messages, spans = rows[index], [], 0
        assert row["turns"] == len(replies)
        for user, reply in zip(users, replies):
            messages.append({"role": "user", "content": user})
            start = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
            messages.append({"role": "assistant", "content": reply})
            end = len(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
            assert tok.decode(row["input_ids"][start:end]).startswith(reply)  # the recorded text, not the base's
            assert all(row["loss_mask"][start:end])
            spans += end - start
        assert sum(row["loss_mask"]) == spans  # only assistant turns are trained on
        with torch.no_grad():
            argmax = base(torch.tensor([row["input_ids"]])).logits[0].argmax(-1).tolist()
        assert row["labels"][1:] == argmax[:-1]  # the base's own next token after every recorded prefix
        assert row["labels"] != row["input_ids"]
    summary = json.loads((tmp_path / "run" / "data" / "data_summary.json").read_text())
    assert summary["turns_kept_as_recorded"] == 3 and summary["turns_regenerated"] == 0
    assert summary["sequences_per_source"] == {"conversations:recorded": 2}
    assert summary["generated_tokens_this_run_rank0"] == 0 and summary["text_tokens_this_run_rank0"] > 0

    from medusa_toolkit.train.trainer import collate

    ids, targets, mask, _ = collate([rows[0], rows[1]], 512, "cpu")
    assert targets[0, : len(rows[0]["labels"])].tolist() == rows[0]["labels"] and not torch.equal(ids, targets)


def test_regenerate_false_needs_recorded_turns_and_the_base_in_process(tmp_path):
    from medusa_toolkit.config import ConfigError
    from medusa_toolkit.pipeline.stages import check_inputs

    model_dir = tiny_model_dir(tmp_path / "model")
    raw = base_config(model_dir)
    raw["data"]["sources"] = [{"source": "builtin", "regenerate": False}]
    with pytest.raises(ConfigError, match="chitchat or conversations"):
        check_inputs(config_from_dict(raw), ["data"])
    raw["data"].update(sources=[{"source": "chitchat", "regenerate": False}], engine="openai",
                       endpoint="http://127.0.0.1:9/v1")  # fmt: skip
    with pytest.raises(ConfigError, match="engine: hf"):
        check_inputs(config_from_dict(raw), ["data"])


def test_chitchat_conversations_alternate_and_open_with_the_training_prompts():
    from medusa_toolkit.prompts import chitchat_conversations, chitchat_prompts, user_reply_pairs

    convs = chitchat_conversations("train")
    assert [c[0][1] for c in convs] == chitchat_prompts("train")
    pairs = [user_reply_pairs(c) for c in convs[:50]]
    assert all(len(u) == len(r) for u, r in pairs) and sum(len(u) for u, _ in pairs) > 200
    assert all(len(c) == 1 for c, (u, _) in zip(convs, pairs) if not u)  # only unanswered openers give no pair
    users, replies = user_reply_pairs([("assistant", "x"), ("user", "a"), ("user", "b"), ("assistant", "c"),
                                       ("user", "d")])  # fmt: skip
    assert (users, replies) == (["a\nb"], ["c"])


def test_eval_set_covers_four_domains_never_used_for_training():
    pairs = eval_prompts()
    assert {d for d, _ in pairs} == set(EVAL_DOMAINS)
    assert all(sum(d == domain for d, _ in pairs) >= 30 for domain in EVAL_DOMAINS)
    first = interleave_domains(pairs)[:8]
    assert [d for d, _ in first] == list(EVAL_DOMAINS) * 2
    with pytest.raises(Exception, match="eval"):
        config_from_dict({"data": {"sources": [{"source": "eval"}]}})  # held out: never a training source
