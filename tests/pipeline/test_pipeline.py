"""The main job end to end on a tiny model: `medusa-train` runs data -> train -> tree -> verify -> export (+ push to a
local Hub), every artefact is checked, a rerun reuses everything, and a run killed mid-pipeline resumes cleanly."""

from __future__ import annotations

import json

import yaml
from huggingface_hub import HfApi

from medusa_toolkit import MedusaHeads, MedusaTree
from medusa_toolkit.testing.tiny import tiny_model_dir
from medusa_toolkit.train.cli import main as train_main

TOKEN = "hf_test_token"


def write_config(tmp_path, model_dir, push: str | None) -> str:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "heads": {"num_heads": 3, "head_type": "per_head_lm_head"},
        "data": {"sources": [{"source": "builtin"}], "num_prompts": 8, "max_new_tokens": 32, "batch_size": 4, "eval_fraction": 0.25,
                 "shard_size": 4},
        "train": {"epochs": 30.0, "micro_batch_size": 4, "learning_rate": 3e-3, "eval_every": 10, "log_every": 10,
                  "checkpoint_every": 20},
        "tree": {"max_nodes": 8, "top_k": 4, "num_calibration_prompts": 2, "num_validation_prompts": 2,
                 "calibration_max_new_tokens": 16, "latency_repeats": 1, "prefix_length": 16},
        "verify": {"prompts": "builtin", "num_prompts": 2, "max_new_tokens": 16, "attn_implementation": "sdpa"},
        "export": {"formats": ["medusa", "vllm"], "push_to_hub": push, "base_model_id": "org/tiny-base"},
        "logging": {"wandb_mode": "disabled", "progress": False},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_whole_pipeline_then_cached_rerun(tmp_path, hub_env, capsys):
    hub = hub_env(token=TOKEN)
    model_dir = tiny_model_dir(tmp_path / "model")
    config = write_config(tmp_path, model_dir, push="me/tiny-medusa")
    assert train_main([config]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out

    # every stage left its artefact, stamped with a manifest
    for stage, folder in (
        ("data", "data"),
        ("train", "heads"),
        ("tree", "tree"),
        ("verify", "verify"),
        ("export", "export"),
    ):
        assert json.loads((run / folder / "manifest.json").read_text())["stage"] == stage
    summary = json.loads((run / "heads" / "training_summary.json").read_text())
    assert summary["num_heads"] == 3 and summary["steps"] > 0
    tree = MedusaTree.from_file(run / "tree" / "tree.json")
    assert 1 <= tree.num_nodes <= 8 and tree.depth <= 3
    assert {"acceptance_heatmap.png", "tree.png"} <= {p.name for p in (run / "tree").glob("*.png")}
    report = json.loads((run / "verify" / "report.json").read_text())
    assert report["verdict"]["passed"] and report["summary"]["mismatches"] == 0
    assert (run / "verify" / "junit.xml").is_file()
    for fmt in ("medusa", "vllm"):
        assert (run / "export" / fmt / "README.md").is_file() and (run / "export" / fmt / "config.json").is_file()
    assert MedusaHeads.from_pretrained(run / "export" / "medusa").num_heads == 3
    # pushed: one commit per package to the local Hub
    assert [c["repo"] for c in hub.state.commits] == ["me/tiny-medusa", "me/tiny-medusa-vllm"]
    assert "medusa_lm_head.safetensors" in HfApi(endpoint=hub.endpoint).list_repo_files("me/tiny-medusa")
    # the closing summary names every stage's outcome
    assert "medusa-train summary" in out and "verify   PASS" in out and "export   medusa" in out

    # a rerun reuses every stage
    assert train_main([config]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] cached" in out for s in ("data", "train", "tree", "verify", "export"))
    assert len(hub.state.commits) == 2


def test_run_killed_mid_pipeline_resumes(tmp_path, monkeypatch, capsys):
    from medusa_toolkit.tuning import stage

    model_dir = tiny_model_dir(tmp_path / "model")
    config = write_config(tmp_path, model_dir, push=None)
    real = stage.run_tree

    def killed(run):
        (run.out / "half-written.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "run_tree", killed)
    assert train_main([config, "--stages", "data,train,tree"]) == 130  # Ctrl-C: one line saying how to go on
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    run = tmp_path / "run"
    assert (run / "heads" / "manifest.json").is_file() and not (run / "tree").exists()

    monkeypatch.setattr(stage, "run_tree", real)
    assert train_main([config, "--stages", "data,train,tree"]) == 0
    out = capsys.readouterr().out
    assert "[data] cached" in out and "[train] cached" in out and "[tree] done" in out
    assert not (run / "tree" / "half-written.json").exists() and (run / "tree" / "tree.json").is_file()
