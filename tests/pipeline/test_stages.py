"""Stage runner: artefacts are cached by input hash, `train.resume` is not an input, missing upstream is an error."""

from __future__ import annotations

import pytest

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.pipeline import stages


@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def data(run):
        calls.append("data")
        (run.out / "rows.txt").write_text(str(run.cfg.data.num_prompts))

    registry = {
        "data": stages.Stage("data", "x:y", ("model", "data"), ()),
        "train": stages.Stage("train", "x:z", ("model", "heads", "train"), ("data",), ("data",)),
    }
    monkeypatch.setattr(stages, "STAGES", registry)
    monkeypatch.setattr(
        stages.Stage, "function", lambda self: {"data": data, "train": lambda run: calls.append("train")}[self.name]
    )
    return calls


def test_cache_and_invalidation(tmp_path, fake_stages):
    cfg = config_from_dict({"data": {"num_prompts": 5}})
    stages.run_pipeline(cfg, tmp_path, ["data", "train"])
    stages.run_pipeline(cfg, tmp_path, ["data", "train"])
    assert fake_stages == ["data", "train"]  # second run fully cached
    assert (tmp_path / "data" / "rows.txt").read_text() == "5" and (tmp_path / "config.resolved.yaml").is_file()
    stages.run_pipeline(
        config_from_dict({"data": {"num_prompts": 5}, "train": {"resume": True}}), tmp_path, ["data", "train"]
    )
    assert fake_stages == ["data", "train"]  # resume changes how, not what: still cached
    stages.run_pipeline(config_from_dict({"data": {"num_prompts": 6}}), tmp_path, ["data", "train"])
    assert fake_stages == ["data", "train", "data", "train"]  # new data invalidates data and everything after it


def test_missing_upstream_and_unknown_stage(tmp_path, fake_stages):
    with pytest.raises(stages.StageError, match="run stage 'data' first"):
        stages.run_pipeline(config_from_dict({}), tmp_path, ["train"])
    with pytest.raises(stages.StageError, match="unknown stage"):
        stages.run_pipeline(config_from_dict({}), tmp_path, ["trian"])
