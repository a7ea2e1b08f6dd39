"""What the toolkit vouches for must be true (issue "Trust"): content-keyed stage caches, verify reports bound to the
heads they verified, one exit-code contract, and no user file ever deleted. One test per reproduced defect."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medusa_toolkit import MedusaHeads
from medusa_toolkit.config import config_from_dict, load_config
from medusa_toolkit.export.cli import main as export_main
from medusa_toolkit.pipeline import stages
from medusa_toolkit.testing.tiny import BYTE_VOCAB
from medusa_toolkit.train.cli import main as train_main
from medusa_toolkit.verify.cli import main as verify_main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"


def heads_for(model_dir: Path, folder: Path, seed: int) -> Path:
    """Heads that fit the tiny model (2 heads), with seed-dependent weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    heads = MedusaHeads(64, BYTE_VOCAB, 2, base_model_name_or_path=str(model_dir))
    heads.init_from_lm_head(AutoModelForCausalLM.from_pretrained(model_dir).lm_head.weight)
    with torch.no_grad():
        for block in (h[0].linear for h in heads.heads):
            block.weight.normal_(0, 0.01)
    return heads.save_pretrained(folder)


def verify_report(model_dir: Path, heads: Path, out: Path, tree: str = "chain-2") -> Path:
    argv = ["--base", str(model_dir), "--heads", str(heads), "--prompts", "builtin", "--num-prompts", "1",
            "--max-new-tokens", "4", "--attn", "sdpa", "--tree", tree, "--report", str(out), "--no-progress"]  # fmt: skip
    assert verify_main(argv) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 1. Stale artefacts: the cache keys on the content of every file the config names


def test_changed_prompts_file_reruns_the_data_stage(tmp_path, monkeypatch):
    calls = []
    registry = {"data": stages.Stage("data", "x:y", ("model", "data"), ())}
    monkeypatch.setattr(stages, "STAGES", registry)
    monkeypatch.setattr(
        stages.Stage, "function", lambda self: lambda run: calls.append(Path(run.cfg.data.sources[0].path).read_text())
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n")
    cfg = config_from_dict({"data": {"sources": [{"source": "file", "path": str(prompts)}]}})
    stages.run_pipeline(cfg, tmp_path / "run", ["data"])
    stages.run_pipeline(cfg, tmp_path / "run", ["data"])
    assert calls == ["first prompt\n"]  # unchanged file: cached
    prompts.write_text("every prompt replaced\n")
    stages.run_pipeline(cfg, tmp_path / "run", ["data"])
    assert calls == ["first prompt\n", "every prompt replaced\n"]


def test_changed_tree_file_reruns_the_tree_stage_and_what_follows(tmp_path, model_dir, monkeypatch):
    run = tmp_path / "run"

    def fake_train(run):
        heads_for(model_dir, run.out, seed=0)

    real_function = stages.Stage.function
    monkeypatch.setattr(
        stages.Stage, "function", lambda self: fake_train if self.name == "train" else real_function(self)
    )
    tree_file = tmp_path / "my_tree.json"
    tree_file.write_text("[[0]]")
    cfg = config_from_dict({"model": {"name_or_path": str(model_dir)}, "tree": {"tree": str(tree_file)}})
    monkeypatch.setitem(stages.STAGES, "train", stages.Stage("train", "x:y", ("model", "heads", "train"), (), ()))
    stages.run_pipeline(cfg, run, ["train", "tree"])
    assert json.loads((run / "tree" / "tree.json").read_text())["paths"] == [[0]]
    tree_file.write_text("[[0], [1], [0, 0]]")
    log = []
    stages.run_pipeline(cfg, run, ["train", "tree"], log=log.append)
    assert json.loads((run / "tree" / "tree.json").read_text())["paths"] == [[0], [1], [0, 0]]
    assert any(line.startswith("[train] cached") for line in log) and any("[tree] done" in line for line in log)


def test_an_artefact_edited_on_disk_is_not_cached_and_user_files_are_kept(tmp_path, monkeypatch):
    calls = []

    def data(run):
        calls.append(1)
        (run.out / "rows.txt").write_text("rows")

    monkeypatch.setattr(stages, "STAGES", {"data": stages.Stage("data", "x:y", ("model", "data"), ())})
    monkeypatch.setattr(stages.Stage, "function", lambda self: data)
    cfg = config_from_dict({})
    stages.run_pipeline(cfg, tmp_path, ["data"])
    (tmp_path / "data" / "rows.txt").write_text("tampered")
    log = []
    stages.run_pipeline(cfg, tmp_path, ["data"], log=log.append)
    assert len(calls) == 2 and (tmp_path / "data" / "rows.txt").read_text() == "rows"
    assert any("changed on disk" in line for line in log)
    (tmp_path / "data" / "my-notes.txt").write_text("mine")  # the user's file inside an artefact folder
    with pytest.raises(stages.StageError, match="my-notes.txt"):
        stages.run_pipeline(cfg, tmp_path, ["data"], force=True)
    assert (tmp_path / "data" / "my-notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# 2. The push gate and the model card accept a report only for the exact heads being pushed


def test_push_gate_refuses_a_report_about_other_heads(tmp_path, model_dir, hub_env, capsys):
    hub = hub_env(token=TOKEN)
    verified = heads_for(model_dir, tmp_path / "verified", seed=0)
    other = heads_for(model_dir, tmp_path / "other", seed=1)
    report = verify_report(model_dir, verified, tmp_path / "report.json")
    capsys.readouterr()
    common = ["--base-model", str(model_dir), "--base-model-id", "org/tiny", "--verification", str(report),
              "--no-tokenizer", "--push-to-hub", "me/heads"]  # fmt: skip
    assert export_main(["--heads", str(other), "--out", str(tmp_path / "out-other"), *common]) == 2
    err = capsys.readouterr().err
    data = json.loads(report.read_text())
    assert "refusing to push" in err and data["settings"]["heads_sha256"][:12] in err
    assert MedusaHeads.from_pretrained(other).content_digest()[:12] in err and not hub.state.calls
    # Retrained heads (same folder, new weights) with the old report: refused too.
    heads_for(model_dir, verified, seed=2)
    assert export_main(["--heads", str(verified), "--out", str(tmp_path / "out-retrained"), *common]) == 2
    assert not hub.state.commits
    # The heads the report verified: pushed, and the card says so with their hash.
    heads_for(model_dir, verified, seed=0)
    assert export_main(["--heads", str(verified), "--out", str(tmp_path / "out-ok"), *common]) == 0
    card = (tmp_path / "out-ok" / "medusa" / "README.md").read_text()
    assert "Lossless: passed" in card and data["settings"]["heads_sha256"] in card
    # Without a push, a card for other heads must not claim the report's verdict.
    assert export_main(["--heads", str(other), "--out", str(tmp_path / "card-other"), *common[:-2]]) == 0
    card = (tmp_path / "card-other" / "medusa" / "README.md").read_text()
    assert "Lossless: passed" not in card and "Not verified" in card


# ----------------------------------------------------------------------------------------------------------------------
# 3, 4. Exit codes CI can rely on; every --help works without the dev extras


def test_truncated_weights_are_a_load_error_not_a_mismatch(tmp_path, model_dir, capsys):
    heads = heads_for(model_dir, tmp_path / "heads", seed=0)
    weights = heads / "medusa_lm_head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    argv = ["--base", str(model_dir), "--heads", str(heads), "--prompts", "builtin", "--no-progress"]
    assert verify_main(argv) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "Traceback" not in err
    assert export_main(["--heads", str(heads), "--out", str(tmp_path / "out"), "--no-tokenizer"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["train.cli", "verify.cli", "tuning.cli", "export.cli"])
def test_help_works_without_dev_extras(module):
    """`pip install medusa-toolkit` has no scipy, pytest or ruff: every --help must still work."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ("scipy", "pytest", "_pytest", "ruff", "pytest_timeout"))
    code = f"import sys; {blocked}; from medusa_toolkit.{module} import main; sys.exit(main(['--help']))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------------
# 5. Floats written the way the README writes them


def test_scientific_notation_floats_from_yaml_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n")
    assert load_config(path).train.learning_rate == pytest.approx(2e-4)
    cfg = load_config(path, ["train.learning_rate=1e-3", "verify.tie_tolerance=5e-2"])
    assert cfg.train.learning_rate == pytest.approx(1e-3) and cfg.verify.tie_tolerance == pytest.approx(0.05)
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # why: PyYAML's YAML 1.1 resolver reads it as a string


# ----------------------------------------------------------------------------------------------------------------------
# 6. Export never deletes what it did not write


def test_export_refuses_to_replace_a_folder_with_user_files(tmp_path, model_dir, capsys):
    heads = heads_for(model_dir, tmp_path / "heads", seed=0)
    out = tmp_path / "out"
    args = ["--heads", str(heads), "--out", str(out), "--no-tokenizer", "--base-model-id", "org/tiny"]
    assert export_main(args) == 0
    assert export_main(args) == 0  # our own earlier package is replaced
    (out / "medusa" / "mine.txt").write_text("keep me")
    assert export_main(args) == 2
    assert "mine.txt" in capsys.readouterr().err and (out / "medusa" / "mine.txt").read_text() == "keep me"
    edited = tmp_path / "edited"
    assert export_main([*args[:2], "--out", str(edited), *args[4:]]) == 0
    (edited / "vllm" / "README.md").write_text("my own card")  # a file we wrote, edited by the user
    assert export_main([*args[:2], "--out", str(edited), *args[4:]]) == 2
    assert (edited / "vllm" / "README.md").read_text() == "my own card"


# ----------------------------------------------------------------------------------------------------------------------
# 7. A network failure during a push is one clear line, with nothing half-written left behind


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_one_line_and_leaves_no_temp_folder(tmp_path, model_dir, monkeypatch, capsys):
    from medusa_toolkit import hub

    monkeypatch.setattr(hub.time, "sleep", lambda s: None)  # the retries still happen, without the waits
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants(), "HF_HUB_OFFLINE", False)
    run = tmp_path / "run"
    heads_for(model_dir, run / "heads", seed=0)
    report = verify_report(model_dir, run / "heads", tmp_path / "report.json")
    capsys.readouterr()
    rc = export_main(["--heads", str(run / "heads"), "--out", str(run / "export"), "--no-tokenizer", "--base-model-id",
                      "org/tiny", "--verification", str(report), "--push-to-hub", "me/heads"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "could not reach" in err and "retries" in err and "Traceback" not in err
    assert err.count("medusa-export: error") == 1
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".export.tmp")]


def hub_constants():
    from huggingface_hub import constants

    return constants


# ----------------------------------------------------------------------------------------------------------------------
# 8. A CI gate given a file checks every prompt in it, and says "N of M"


def test_verify_checks_every_prompt_of_a_file(tmp_path, model_dir, capsys):
    heads = heads_for(model_dir, tmp_path / "heads", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    report = tmp_path / "report.json"
    argv = ["--base", str(model_dir), "--heads", str(heads), "--prompts", str(prompts), "--max-new-tokens", "2",
            "--attn", "sdpa", "--report", str(report), "--no-progress"]  # fmt: skip
    assert verify_main(argv) == 0
    data = json.loads(report.read_text())
    assert data["summary"]["prompts"] == 12 and data["settings"]["available_prompts"] == 12
    assert "12 of 12 prompts" in capsys.readouterr().out
    assert verify_main([*argv, "--num-prompts", "5"]) == 0
    assert "5 of 12 prompts" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# 9. Bad input fails before the first stage


def test_empty_stages_and_missing_files_fail_before_any_stage(tmp_path, model_dir, capsys):
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
           "data": {"sources": [{"source": "builtin"}], "num_prompts": 2}, "logging": {"progress": False, "wandb_mode": "disabled"},
           "train": {"deepspeed": {"config_file": str(tmp_path / "missing-ds.json")}}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main([str(path), "--stages", ""]) == 2
    assert "--stages" in capsys.readouterr().err
    assert train_main([str(path), "--stages", "data,train"]) == 2
    assert "missing-ds.json" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()  # no minutes of generation before the typo is found
    cfg["train"] = {}
    cfg["verify"] = {"prompts": str(tmp_path / "missing-prompts.jsonl")}
    path.write_text(yaml.safe_dump(cfg))
    assert train_main([str(path)]) == 2
    assert "missing-prompts.jsonl" in capsys.readouterr().err and not (tmp_path / "run" / "data").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 11. The base is named by a Hub id in anything pushed; offline Hub errors give the right fix


def test_pushed_packages_need_a_hub_id_for_the_base(tmp_path, model_dir, capsys):
    heads = heads_for(model_dir, tmp_path / "heads", seed=0)
    report = verify_report(model_dir, heads, tmp_path / "report.json")
    capsys.readouterr()
    argv = ["--heads", str(heads), "--out", str(tmp_path / "out"), "--no-tokenizer", "--verification", str(report),
            "--base-model", str(model_dir)]  # fmt: skip
    assert export_main([*argv, "--push-to-hub", "me/heads"]) == 2
    assert "--base-model-id" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="not a Hub id"):
        assert export_main(argv) == 0
    assert json.loads((tmp_path / "out" / "medusa" / "config.json").read_text())["base_model_name_or_path"]
    assert export_main([*argv, "--base-model-id", "org/tiny"]) == 0
    config = json.loads((tmp_path / "out" / "vllm" / "config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny"


def test_uncached_hub_base_offline_names_the_real_fix():
    from medusa_toolkit.model.base_model import ModelLoadError, load_base_model

    with pytest.raises(ModelLoadError) as info:
        load_base_model("some-org/not-cached-anywhere")
    message = str(info.value)
    assert "hf download some-org/not-cached-anywhere" in message and "tokenizer.save_pretrained" not in message


# ----------------------------------------------------------------------------------------------------------------------
# 12. No false compatibility claims


def test_no_claim_that_upstream_medusa_loads_the_package():
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `medusa`"))
    assert "upstream Medusa" not in row.split("|")[-2]  # the "loaded by" column
    from medusa_toolkit.export.model_card import CardInfo, build_model_card

    info = CardInfo(fmt="medusa", heads_config={"medusa_num_heads": 2, "medusa_num_layers": 1, "hidden_size": 8,
                    "vocab_size": 16, "head_type": "per_head_lm_head"}, base_model="org/base")  # fmt: skip
    assert "read by Medusa" not in str(build_model_card(info))
