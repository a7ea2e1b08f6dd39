"""Trust under faults and misuse (issue "Trust under faults and misuse"): every behaviour the second fault probe found,
reproduced with the real CLIs on tiny models, by class — what a cached stage vouches for, what is published and
when, which files packaging trusts, non-finite numbers, one writer per run folder, checkpoints never discarded
silently, a serving engine's answers, heads that fit base and tree, checks before any work, and one exit-code mapping.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from medusa_toolkit import MedusaHeads
from medusa_toolkit.export.cli import main as export_main
from medusa_toolkit.run_dir import RunDir
from medusa_toolkit.testing.tiny import BYTE_VOCAB
from medusa_toolkit.train.cli import main as train_main
from medusa_toolkit.tuning.cli import main as tune_main
from medusa_toolkit.verify.cli import main as verify_main

TOKEN = "hf_test_token"


def config(tmp_path: Path, model_dir: Path, run: Path, **sections) -> str:
    """A small whole-pipeline config for the tiny model (seconds per stage); `sections` update it."""
    cfg = {
        "output_dir": str(run),
        "model": {"name_or_path": str(model_dir)},
        "heads": {"num_heads": 2, "head_type": "per_head_lm_head"},
        "data": {"sources": [{"source": "builtin"}], "num_prompts": 6, "max_new_tokens": 16, "batch_size": 3,
                 "eval_fraction": 0.34, "shard_size": 3},
        "train": {"epochs": 4.0, "micro_batch_size": 2, "learning_rate": 3e-3, "eval_every": 4, "log_every": 2,
                  "checkpoint_every": 2},
        "tree": {"tree": "chain-2"},
        "verify": {"prompts": "builtin", "num_prompts": 1, "max_new_tokens": 8, "attn_implementation": "sdpa"},
        "export": {"formats": ["medusa"], "base_model_id": "org/tiny-base", "include_tokenizer": False},
        "logging": {"wandb_mode": "disabled", "progress": False},
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir):
    """A finished run of every stage; tests work on copies of it (`copy_run`)."""
    root = tmp_path_factory.mktemp("finished")
    assert train_main([config(root, model_dir, root / "run")]) == 0
    return root / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run


def heads_for(model_dir: Path, folder: Path, seed: int = 0, num_heads: int = 2) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    heads = MedusaHeads(64, BYTE_VOCAB, num_heads, base_model_name_or_path=str(model_dir))
    heads.init_from_lm_head(AutoModelForCausalLM.from_pretrained(model_dir).lm_head.weight)
    return heads.save_pretrained(folder)


def one_line(err: str) -> bool:
    """The contract for bad input: one `prog: error:` line and no traceback (progress bars may be there too)."""
    return "Traceback" not in err and sum(": error:" in line for line in err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# What a cached stage vouches for


def test_truncated_heads_are_never_a_cached_pass(finished, tmp_path, model_dir, capsys):
    """#1: a truncated heads file under a cached verify stage: refused (exit 2), naming the file and the rerun."""
    run = copy_run(finished, tmp_path)
    cfg = config(tmp_path, model_dir, run)
    weights = run / "heads" / "medusa_lm_head.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    report_before = (run / "verify" / "report.json").read_bytes()
    capsys.readouterr()
    assert train_main([cfg, "--stages", "verify"]) == 2
    err = capsys.readouterr().err
    assert "medusa_lm_head.safetensors" in err and "--stages train,verify" in err and one_line(err)
    assert (run / "verify" / "report.json").read_bytes() == report_before  # nothing claimed, nothing rewritten
    assert train_main([cfg, "--stages", "train,verify"]) == 0  # rerunning what changed mends it
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("boundary", ["train", "tree", "verify", "export"])
def test_a_run_killed_at_a_stage_boundary_reruns_without_trusting_or_losing_anything(
    boundary, finished, tmp_path, model_dir, capsys
):
    """A kill (SIGKILL: no cleanup) at the start of a stage leaves its temp folder and the lock file; the rerun
    reuses exactly the stages before it, removes the dead run's temp folder, and redoes the rest."""
    order = ["data", "train", "tree", "verify", "export"]
    run = copy_run(finished, tmp_path)
    for stage in order[order.index(boundary) :]:
        shutil.rmtree(RunDir(run).artefact(stage))
    stale = run / f".{boundary}.tmp-999-dead"
    stale.mkdir()
    (stale / "half.json").write_text("{")
    (run / ".lock").write_text("medusa-train (pid 999 on a host, since yesterday)\n")  # its holder is gone
    capsys.readouterr()
    assert train_main([config(tmp_path, model_dir, run)]) == 0
    out = capsys.readouterr().out
    for stage in order[: order.index(boundary)]:
        assert f"[{stage}] cached" in out
    for stage in order[order.index(boundary) :]:
        assert f"[{stage}] done" in out
    assert not stale.exists() and "left by a run that was killed" in out
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    assert json.loads((run / "verify" / "report.json").read_text())["verdict"]["passed"]


# ----------------------------------------------------------------------------------------------------------------------
# What is published, and when


def test_a_refused_export_publishes_nothing(finished, tmp_path, model_dir, hub_env, capsys):
    """#2: the user's file in RUN/export makes the export stage refuse, before anything leaves the machine."""
    hub = hub_env(token=TOKEN)
    run = copy_run(finished, tmp_path)
    (run / "export" / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = train_main([config(tmp_path, model_dir, run), "--stages", "export", "--set", "export.push_to_hub=me/heads"])
    err = capsys.readouterr().err
    assert rc == 2 and "notes.txt" in err and not hub.state.calls and not hub.state.commits
    assert (run / "export" / "notes.txt").read_text() == "mine"


def test_files_linked_out_of_a_heads_or_run_folder_are_never_published(tmp_path, model_dir, hub_env, capsys):
    """#3: a link in the heads folder (or the run's tree/) to a private file: skipped, said, never pushed."""
    hub = hub_env(token=TOKEN)
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET-KEY-MATERIAL")
    run = tmp_path / "run"
    heads = heads_for(model_dir, run / "heads")
    (heads / "x.png").symlink_to(secret)
    (run / "tree").mkdir()
    (run / "tree" / "y.png").symlink_to(secret)
    (run / "config.resolved.yaml").symlink_to(secret)
    capsys.readouterr()
    rc = export_main(["--heads", str(heads), "--out", str(tmp_path / "out"), "--no-tokenizer", "--base-model-id",
                      "org/tiny", "--allow-unverified", "--push-to-hub", "me/heads"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "x.png (a link)" in out and "y.png (a link)" in out and "config.resolved.yaml (a link)" in out
    published = hub.state.files("me/heads")
    assert not any(b"SECRET" in content for content in published.values())
    assert not any(name.endswith(("x.png", "y.png", "config.resolved.yaml")) for name in published)


# ----------------------------------------------------------------------------------------------------------------------
# Numbers that are not numbers


@pytest.mark.parametrize("value", ["1e30", ".inf", ".nan"])
def test_impossible_learning_rates_fail_before_any_work(value, tmp_path, model_dir, capsys):
    """#4: learning_rate 1e30 or inf (every weight nan within a step) is a config error, before anything runs."""
    run = tmp_path / "run"
    assert train_main([config(tmp_path, model_dir, run), "--set", f"train.learning_rate={value}"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and one_line(err) and not run.exists()


def test_a_diverging_training_stops_and_nan_heads_never_ship(
    finished, tmp_path, model_dir, hub_env, monkeypatch, capsys
):
    """#4: a nan loss stops training (exit 2, no heads written); nan heads fail verification (the report says so) and
    are refused by export and by a push, even with --allow-unverified."""
    from medusa_toolkit.train import losses

    run = copy_run(finished, tmp_path)
    real = losses.MedusaObjective.forward

    def diverged(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        return loss * float("nan"), stats * float("nan")

    monkeypatch.setattr(losses.MedusaObjective, "forward", diverged)
    capsys.readouterr()
    assert train_main([config(tmp_path, model_dir, run, train={"learning_rate": 2e-3})]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "learning_rate" in err and one_line(err)
    assert (run / "heads" / "manifest.json").is_file()  # the earlier heads stay; nothing half-trained replaced them
    monkeypatch.setattr(losses.MedusaObjective, "forward", real)

    nan_heads = MedusaHeads.from_pretrained(run / "heads")
    with torch.no_grad():
        next(nan_heads.parameters()).fill_(float("nan"))
    nan_dir = nan_heads.save_pretrained(tmp_path / "nan-heads")
    report = tmp_path / "report.json"
    rc = verify_main(["--base", str(model_dir), "--heads", str(nan_dir), "--prompts", "builtin", "--num-prompts", "1",
                      "--max-new-tokens", "4", "--attn", "sdpa", "--tree", "chain-2", "--report", str(report),
                      "--no-progress"])  # fmt: skip
    data = json.loads(report.read_text())
    assert rc == 1 and data["settings"]["heads_finite"] is False and "nan or inf" in data["verdict"]["reasons"][0]
    hub = hub_env(token=TOKEN)
    capsys.readouterr()
    rc = export_main(["--heads", str(nan_dir), "--out", str(tmp_path / "out"), "--no-tokenizer", "--base-model-id",
                      "org/tiny", "--allow-unverified", "--push-to-hub", "me/nan"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "nan or inf" in err and not hub.state.calls and not (tmp_path / "out" / "medusa").exists()


# ----------------------------------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holder_blocks_nothing(tmp_path, model_dir, capsys):
    """#5: a live holder (another process) makes medusa-train exit 2 naming it, before any work; once that process
    dies the lock is free again (the kernel drops it), whatever is left in the lock file."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medusa_toolkit.run_dir import RunLock; "
         "lock = RunLock(sys.argv[1], 'medusa-train').acquire(); print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert train_main([config(tmp_path, model_dir, run), "--stages", "data"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use by medusa-train" in err and not (run / "data").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train_main([config(tmp_path, model_dir, run), "--stages", "data"]) == 0
    assert (run / "data" / "manifest.json").is_file()


def test_two_concurrent_runs_on_one_folder_one_wins_the_other_is_refused(tmp_path, model_dir):
    """#5: two medusa-train processes started together on one folder: one exits 2 at once ("in use"), the other
    writes a whole data artefact; neither deletes the other's files (the old fixed temp names made one crash)."""
    cfg = config(tmp_path, model_dir, tmp_path / "run")
    # Two independent commands: no launcher variables (an in-process test run may have left a world of one's behind).
    launcher = ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    cmd = [sys.executable, "-m", "medusa_toolkit.train.cli", cfg, "--stages", "data"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # One holds the lock while it generates; the other is refused, or (had the first finished before it even
    # started) finds the artefact cached. Never a crash, never a half artefact.
    assert codes in ([0, 2], [0, 0]), results
    for code, err in results:
        assert "Traceback" not in err and (code == 0 or "in use by medusa-train" in err), err
    assert (tmp_path / "run" / "data" / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------------------------------
# Nothing discarded silently


def _interrupted_training(tmp_path, model_dir, monkeypatch) -> tuple[Path, str]:
    from medusa_toolkit.train import trainer

    real = trainer.save_checkpoint

    def save_then_interrupt(engine, folder, progress, *args):
        real(engine, folder, progress, *args)
        raise KeyboardInterrupt

    run = tmp_path / "run"
    cfg = config(tmp_path, model_dir, run)
    with monkeypatch.context() as m:
        m.setattr(trainer, "save_checkpoint", save_then_interrupt)
        assert train_main([cfg, "--stages", "data,train"]) == 130
    assert (run / "checkpoints" / "run.json").is_file()
    return run, cfg


def test_an_interrupted_training_is_never_discarded_by_a_changed_setting(tmp_path, model_dir, monkeypatch, capsys):
    """#6: a rerun with another train setting and no --resume: exit 2 saying what changed; --force discards."""
    run, cfg = _interrupted_training(tmp_path, model_dir, monkeypatch)
    capsys.readouterr()
    assert train_main([cfg, "--stages", "data,train", "--set", "train.log_every=3"]) == 2
    err = capsys.readouterr().err
    assert "train.log_every: 2 -> 3" in err and "--force" in err and one_line(err)
    assert list((run / "checkpoints").glob("step-*"))  # kept
    assert train_main([cfg, "--stages", "data,train", "--set", "train.log_every=3", "--force"]) == 0
    assert "removed the checkpoints" in capsys.readouterr().out


def test_a_stray_file_in_heads_is_refused_before_training(finished, tmp_path, model_dir, capsys):
    """#7: a .DS_Store in heads/ and a changed train setting: refused before any step (the checkpoints of the
    finished run and the heads are untouched), not after training."""
    run = copy_run(finished, tmp_path)
    (run / "heads" / ".DS_Store").write_text("finder")
    heads_before = (run / "heads" / "medusa_lm_head.safetensors").read_bytes()
    capsys.readouterr()
    start = time.perf_counter()
    assert train_main([config(tmp_path, model_dir, run, train={"log_every": 1}), "--stages", "data,train"]) == 2
    err = capsys.readouterr().err
    assert ".DS_Store" in err and "nothing was run" in err and time.perf_counter() - start < 60
    assert (run / "heads" / "medusa_lm_head.safetensors").read_bytes() == heads_before


# ----------------------------------------------------------------------------------------------------------------------
# A serving engine's answers


class _Engine(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI-compatible server whose answer the test sets (`server.answer`: (status, content type, body))."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, kind, body = self.server.answer
        self.server.calls += 1
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def engine():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    server.answer, server.calls = (200, "application/json", "{}"), 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_engine_answers_are_checked_before_they_are_kept(tmp_path, model_dir, engine, monkeypatch, capsys):
    """#8: token ids outside the vocabulary: exit 2, nothing cached (the fixed server is then asked again); an HTML
    200 answer is retried, then exit 2; neither is an internal error."""
    from medusa_toolkit.train.data import openai_client

    monkeypatch.setattr(openai_client.time, "sleep", lambda s: None)
    run = tmp_path / "run"
    cfg = config(tmp_path, model_dir, run, data={"engine": "openai", "endpoint": f"http://127.0.0.1:{engine.server_port}/v1",
                                                 "concurrency": 1})  # fmt: skip
    bad = {"choices": [{"token_ids": [5, BYTE_VOCAB + 100], "text": "x", "finish_reason": "stop"}]}
    engine.answer = (200, "application/json", json.dumps(bad))
    capsys.readouterr()
    assert train_main([cfg, "--stages", "data"]) == 2
    err = capsys.readouterr().err
    assert "outside the model's vocabulary" in err and one_line(err)
    assert not list((run / ".data.partial").rglob("shard-*"))  # nothing of it kept
    engine.answer = (200, "text/html", "<html>proxy login</html>")
    assert train_main([cfg, "--stages", "data"]) == 2
    err = capsys.readouterr().err
    assert "not an OpenAI completion" in err and "text/html" in err and one_line(err)
    good = {"choices": [{"token_ids": [72, 105, 257], "text": "Hi", "finish_reason": "stop"}]}
    engine.answer, engine.calls = (200, "application/json", json.dumps(good)), 0
    assert train_main([cfg, "--stages", "data"]) == 0 and engine.calls >= 4  # asked again: nothing was cached


# ----------------------------------------------------------------------------------------------------------------------
# Heads that fit the base and the tree


def test_export_checks_heads_against_the_base_and_the_tree(tmp_path, model_dir, capsys):
    """#9: heads of another hidden size (per-head or shared) and a tree deeper than the heads: exit 2, no package."""
    for head_type in ("per_head_lm_head", "shared_lm_head"):
        wide = MedusaHeads(128, BYTE_VOCAB, 2, head_type=head_type).save_pretrained(tmp_path / f"wide-{head_type}")
        capsys.readouterr()
        rc = export_main(["--heads", str(wide), "--out", str(tmp_path / f"out-{head_type}"), "--no-tokenizer",
                          "--base-model", str(model_dir)])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "do not fit the base" in err and "hidden 128" in err and one_line(err), err
    heads = heads_for(model_dir, tmp_path / "heads")
    deep = tmp_path / "deep.json"
    deep.write_text("[[0], [0, 0], [0, 0, 0]]")
    rc = export_main(["--heads", str(heads), "--out", str(tmp_path / "out"), "--no-tokenizer", "--tree", str(deep)])
    err = capsys.readouterr().err
    assert rc == 2 and "3 deep" in err and one_line(err) and not (tmp_path / "out" / "medusa").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [("export.push_to_hub=noslash", "not a Hub repo id"), ("tree.tree=chain-5", "the heads number 2")],
)
def test_what_the_config_decides_is_checked_before_the_first_stage(override, needle, tmp_path, model_dir, capsys):
    """#10: a push target that is not ORG/NAME, a tree deeper than the configured heads: exit 2 before any stage."""
    run = tmp_path / "run"
    assert train_main([config(tmp_path, model_dir, run), "--set", override]) == 2
    err = capsys.readouterr().err
    assert needle in err and one_line(err) and not (run / "data").exists()


def test_init_from_never_overrides_the_config(finished, tmp_path, model_dir, capsys):
    """#11: starting heads with 3 heads where 2 are configured: exit 2 naming both; matching ones train on, and the
    trained heads name this run's base, not the one the starting heads came from."""
    three = heads_for(model_dir, tmp_path / "three", num_heads=3)
    run = copy_run(finished, tmp_path)
    assert train_main([config(tmp_path, model_dir, run, heads={"init_from": str(three)}), "--stages", "train"]) == 2
    err = capsys.readouterr().err
    assert "heads.num_heads is 2" in err and "has 3" in err and one_line(err)
    two = MedusaHeads.from_pretrained(heads_for(model_dir, tmp_path / "two"))
    two.config.base_model_name_or_path = "some/other-base"
    two.save_pretrained(tmp_path / "two")
    cfg = config(tmp_path, model_dir, run, heads={"init_from": str(tmp_path / "two")})
    assert train_main([cfg, "--stages", "data,train"]) == 0
    trained = json.loads((run / "heads" / "config.json").read_text())
    assert trained["base_model_name_or_path"] == str(model_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Exit 2 and one line for bad input, whatever raised it


def _bad_input_cases(tmp_path: Path, model_dir: Path) -> dict:
    heads = heads_for(model_dir, tmp_path / "heads")
    common = ["--base", str(model_dir), "--heads", str(heads), "--prompts", "builtin", "--num-prompts", "1",
              "--max-new-tokens", "4", "--attn", "sdpa", "--no-progress"]  # fmt: skip
    (tmp_path / "top_k.json").write_text('{"paths": [[0], [1]], "top_k": "2"}')
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "list-report.json").write_text("[1]")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "far.json").write_text("[[100000]]")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "hello \\ud800 world"}\n')
    truncated = shutil.copytree(model_dir, tmp_path / "truncated-base")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    broken = shutil.copytree(model_dir, tmp_path / "broken-config")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    strings = shutil.copytree(heads, tmp_path / "string-vocab")
    cfg = json.loads((strings / "config.json").read_text())
    (strings / "config.json").write_text(json.dumps({**cfg, "vocab_size": str(cfg["vocab_size"])}))
    ds = tmp_path / "ds.json"
    ds.write_text('{"optimizer": {"type": "NoSuchOptimizer", "params": {"lr": 0.001}}}')
    export = ["--heads", str(heads), "--no-tokenizer", "--base-model", str(model_dir)]
    return {
        "device cuda": (verify_main, [*common, "--device", "cuda:0"], "no CUDA GPU"),
        "tree.json top_k as a string": (verify_main, [*common, "--tree", str(tmp_path / "top_k.json")], "top_k"),
        "export --verification [1]": (export_main, [*export, "--out", str(tmp_path / "o2"), "--verification", str(tmp_path / "list-report.json")], "not a verify report"),
        "export --out FILE/sub": (export_main, [*export, "--out", str(tmp_path / "a-file" / "sub")], "a-file"),
        "train --output-dir FILE": (train_main, [config(tmp_path, model_dir, tmp_path / "run"), "--output-dir", str(tmp_path / "a-file")], "is a file"),
        "truncated base weights": (verify_main, [*common[:1], str(truncated), *common[2:]], "truncated or corrupt"),
        "lone surrogate prompt": (verify_main, [*common[:5], str(tmp_path / "surrogate.jsonl"), *common[6:]], "not valid text"),
        "report to a full disk": (verify_main, [*common, "--report", "/dev/full"], "No space left on device"),
        "unknown DeepSpeed optimizer": (train_main, [config(tmp_path, model_dir, tmp_path / "run2", train={"deepspeed": {"config_file": str(ds)}})], "NoSuchOptimizer"),
        "tune-tree --top-k beyond the vocabulary": (tune_main, [*common[:4], "--top-k", "1000", "--out", str(tmp_path / "t.json")], "tree.top_k is 1000"),
        "tree rank beyond the vocabulary": (verify_main, [*common, "--tree", str(tmp_path / "far.json")], "these heads score 258 tokens"),
        "corrupt base config.json": (verify_main, [*common[:1], str(broken), *common[2:]], "config.json must be the valid JSON"),
        "heads vocab_size as a string": (verify_main, [*common[:3], str(strings), *common[4:]], "vocab_size must be an integer"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, model_dir):
    return _bad_input_cases(tmp_path_factory.mktemp("bad"), model_dir)


@pytest.mark.parametrize(
    "case",
    ["device cuda", "tree.json top_k as a string", "export --verification [1]",
     "export --out FILE/sub", "train --output-dir FILE", "truncated base weights", "lone surrogate prompt",
     "report to a full disk", "unknown DeepSpeed optimizer", "tune-tree --top-k beyond the vocabulary",
     "tree rank beyond the vocabulary", "corrupt base config.json", "heads vocab_size as a string"],
)  # fmt: skip
def test_bad_input_is_exit_2_and_one_line(case, bad_inputs, capsys):
    if case == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: cuda:0 is a valid device here")
    main, argv, needle = bad_inputs[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and one_line(err), err
    assert "save the tokenizer" not in err and "heads vocab 258" not in err


def test_an_empty_tree_exports_as_the_one_node_tree(tmp_path, model_dir):
    """`medusa-export --tree` at `[]` (what the tuner writes when no tree pays): a package, with a warning, not a
    traceback."""
    heads = heads_for(model_dir, tmp_path / "heads")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.warns(UserWarning, match="no paths"):
        rc = export_main(["--heads", str(heads), "--out", str(tmp_path / "out"), "--no-tokenizer", "--tree",
                          str(tmp_path / "empty.json"), "--base-model-id", "org/tiny"])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "out" / "medusa" / "tree.json").read_text())["paths"] == []


def test_the_export_stage_logs_where_its_packages_end_up(finished, tmp_path, model_dir, capsys):
    """The export log names RUN/export/medusa, not the runner's temp folder it is written into first."""
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "export")
    capsys.readouterr()
    assert train_main([config(tmp_path, model_dir, run), "--stages", "export"]) == 0
    out = capsys.readouterr().out
    assert f"medusa package: {run / 'export' / 'medusa'}" in out and ".export.tmp" not in out


def test_one_mapping_from_exceptions_to_exit_codes():
    """An OSError or a ValueError from anywhere is bad input (2, one line), never exit 4; anything else is a bug (4)."""
    from medusa_toolkit.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, classify
    from medusa_toolkit.pipeline.cli import run_command

    assert classify(OSError(28, "No space left on device", "/dev/full")) == (2, "No space left on device: /dev/full")
    assert classify(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))[0] == EXIT_BAD_INPUT
    assert classify(json.JSONDecodeError("Expecting value", "x", 0))[0] == EXIT_BAD_INPUT
    assert classify(KeyboardInterrupt()) == (EXIT_INTERRUPTED, None)
    assert classify(TypeError("a bug")) == (EXIT_INTERNAL, None)

    def fails(exc):
        def body():
            raise exc

        return body

    assert run_command("x", fails(NotADirectoryError(20, "Not a directory", "/f/sub"))) == 2
    assert run_command("x", fails(AttributeError("our bug"))) == 4
