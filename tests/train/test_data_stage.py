"""Data stage: the base's own greedy responses, stored with the right masks; cached, resumable, clear errors."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.model.base_model import load_base_model
from medusa_toolkit.pipeline.stages import StageRun, run_pipeline
from medusa_toolkit.prompts import BUILTIN_PROMPTS, render_prompt
from medusa_toolkit.testing.runs import base_config
from medusa_toolkit.train.data import stage as data_mod


def _cfg(model_dir, **data):
    """The tiny config; `source`, `path`, `field` make its one prompt source."""
    raw = base_config(model_dir)
    source = {k: data.pop(k) for k in ("source", "path", "field", "split") if k in data}
    if source:
        raw["data"]["sources"] = [source]
    raw["data"].update(data)
    return config_from_dict(raw)


def test_data_is_the_base_greedy_output_with_masks(tmp_path, model_dir):
    cfg = _cfg(model_dir)
    run_pipeline(cfg, tmp_path, ["data"])
    ds = datasets.load_from_disk(str(tmp_path / "data"))
    summary = json.loads((tmp_path / "data" / "data_summary.json").read_text())
    # Chat-rendered builtin prompts are 48-60 tokens; 2 exceed max_prompt_tokens=64 - ... and are counted, not lost.
    model, tok = load_base_model(str(model_dir))
    lengths = [len(render_prompt(tok, p)) for p in BUILTIN_PROMPTS]
    too_long = sum(n > 64 for n in lengths)
    assert summary["skipped"]["prompt_too_long"] == too_long > 0
    assert len(ds) == summary["sequences"] == 8 - too_long
    assert sum(ds["heldout"]) == summary["heldout_sequences"] >= 1
    row = ds[0]
    prompt = render_prompt(tok, BUILTIN_PROMPTS[row["prompt_index"]])
    assert row["input_ids"][: row["prompt_length"]] == prompt
    assert row["loss_mask"] == [0] * len(prompt) + [1] * (len(row["input_ids"]) - len(prompt))
    # The response is exactly the base's greedy continuation of that prompt alone (no padding effects).
    single = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0)[
        0, len(prompt) :
    ]
    assert row["input_ids"][len(prompt) :] == single.tolist()[: len(row["input_ids"]) - len(prompt)]


def test_greedy_responses_are_generates_tokens_without_calling_generate(model_dir, monkeypatch):
    """The data stage's greedy path (the decoding loop, 1-node tree) gives generate()'s batched greedy tokens row for
    row, in float32, including rows that end at different steps, and never runs generate() itself."""
    model, tok = load_base_model(str(model_dir))
    prompts = [render_prompt(tok, p) for p in BUILTIN_PROMPTS[:6]]
    cfg = _cfg(model_dir, max_new_tokens=20)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=[])
    # An EOS that row 0 emits mid-way and some row never emits: rows leave the batch at different steps.
    new = free[:, width:].tolist()
    eos = next(t for t in new[0][3:] if any(t not in row for row in new))
    model.generation_config.eos_token_id = eos
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)[:, width:]
    rows = []
    for row in expected.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    assert any(len(r) < 20 for r in rows) and any(len(r) == 20 for r in rows)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("greedy data must not go through generate()"))
    assert data_mod.generate_batch(model, tok, prompts, cfg, 0) == rows


def test_cached_then_resumed_after_interruption(tmp_path, model_dir, monkeypatch, capsys):
    cfg = _cfg(model_dir, train_on_prompt=True)
    reference = tmp_path / "ref"
    run_pipeline(cfg, reference, ["data"])
    # Second call: cached, nothing generated.
    monkeypatch.setattr(data_mod, "generate_batch", lambda *a, **k: pytest.fail("generated although cached"))
    run_pipeline(cfg, reference, ["data"])
    assert "[data] cached" in capsys.readouterr().out
    monkeypatch.undo()
    # Interrupt during the second shard (shards of 3 prompts, batch_size 4: one generate call per shard).
    calls = {"n": 0}
    real = data_mod.generate_batch

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "generate_batch", flaky)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, run, ["data"])
    assert len(list(data_mod.partial_dir(StageRun.prepare(cfg, run, "data")).glob("shard-*"))) == 1
    calls["n"] = -100  # no more interruptions; count the batches the rerun generates
    run_pipeline(cfg, run, ["data"])
    assert calls["n"] == -100 + 2  # 3 shards of 3 prompts, one already done: 2 generate calls
    a, b = datasets.load_from_disk(str(run / "data")), datasets.load_from_disk(str(reference / "data"))
    assert a.to_dict() == b.to_dict()
    assert all(all(m) for m in a["loss_mask"])  # train_on_prompt: prompt tokens are trained on too
    assert not data_mod.partial_dir(StageRun.prepare(cfg, run, "data")).exists()


def test_bad_inputs(tmp_path, model_dir):
    with pytest.raises(data_mod.DataError, match="not found"):
        data_mod.run_data(
            StageRun.prepare(
                _cfg(model_dir, source="file", path=str(tmp_path / "nope.jsonl")), tmp_path, "data", tmp_path
            )
        )
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "hi"}\n')
    with pytest.raises(data_mod.DataError, match="no field 'prompt'.*fields: text"):
        data_mod.run_data(StageRun.prepare(_cfg(model_dir, source="file", path=str(f)), tmp_path, "data", tmp_path))
    with pytest.raises(data_mod.DataError, match="all 8 prompts were skipped"):
        data_mod.run_data(StageRun.prepare(_cfg(model_dir, max_prompt_tokens=5), tmp_path, "data", tmp_path))
    with pytest.raises(data_mod.DataError, match="leaves no room"):
        data_mod.run_data(StageRun.prepare(_cfg(model_dir, max_new_tokens=2000), tmp_path, "data", tmp_path))


def test_unconditional_samples_from_bos(tmp_path, model_dir):
    cfg = _cfg(model_dir, source="none", num_prompts=3, shard_size=8)
    run_pipeline(cfg, tmp_path, ["data"])
    ds = datasets.load_from_disk(str(tmp_path / "data"))
    assert [r[:1] for r in ds["input_ids"]] == [[256]] * 3 and set(ds["prompt_length"]) == {1}
    shutil.rmtree(tmp_path / "data")
