"""Training stage: heads learn the right shift, resume is exact, ZeRO stages agree, kl/ce run, two ranks agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa_toolkit import data_artefact
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.pipeline.stages import MANIFEST, StageRun
from medusa_toolkit.testing.runs import base_config, permutation_run
from medusa_toolkit.train import checkpoints, losses, trainer
from medusa_toolkit.train.cli import main as cli_main

HERE = Path(__file__).resolve().parent  # the torchrun scripts beside this file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model whose greedy text is a permutation language, the data artefact the data stage wrote with it (40
    train + 8 held-out sequences of 44 tokens), and its held-out rows."""
    model, data_run = permutation_run(tmp_path_factory.mktemp("train"))
    heldout = torch.tensor(data_artefact.load(data_run / "data").heldout["input_ids"])
    return model, data_run, heldout


def _run(tmp_path: Path, tiny, name: str, **train) -> tuple[MedusaHeads, Path]:
    model, data_run, _ = tiny
    run = tmp_path / name
    if not (run / "data").exists():
        run.mkdir(parents=True, exist_ok=True)
        os.symlink(data_run / "data", run / "data")
    cfg = config_from_dict(base_config(model, **train))
    out = run / "heads"
    out.mkdir(exist_ok=True)
    return trainer.train(StageRun.prepare(cfg, run, "train", out)), out


def _interrupt_after_checkpoint(monkeypatch, step: int) -> None:
    """Ctrl-C right after the checkpoint of `step` is written (what a user killing the run would leave)."""
    real = trainer.save_checkpoint

    def save_then_interrupt(engine, run_dir, progress, *args):
        real(engine, run_dir, progress, *args)
        if progress.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)


def heldout_top1(model_dir: Path, heads: MedusaHeads, rows: torch.Tensor, head: int = 0) -> float:
    """Independent check: head `head` at position t vs the TRUE token t + head + 2 on the held-out rows' responses."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = heads(base.get_decoder()(rows).last_hidden_state, base.lm_head)[head]
    shift = head + 2
    pred, target = logits[:, 4 - shift : -shift].argmax(-1), rows[:, 4:]  # response positions only
    return (pred == target).float().mean().item()


def test_heads_learn_and_wrong_shift_fails(tmp_path, tiny, monkeypatch):
    model, _, heldout = tiny
    heads, out = _run(tmp_path, tiny, "good", max_steps=25, log_every=1, learning_rate=1e-2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/head0/loss"] < 0.3 * rows[0]["train/head0/loss"]
    good = heldout_top1(model, heads, heldout)
    assert good > 0.7, good
    # The same training with labels shifted by one token too few: the independent check must catch it.
    monkeypatch.setattr(losses, "target_offset", lambda k: k + 1)
    bad_heads, _ = _run(tmp_path, tiny, "bad", max_steps=25, learning_rate=1e-2)
    bad = heldout_top1(model, bad_heads, heldout)
    assert bad < 0.3 < good, (bad, good)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 25 and summary["final_heldout"]["top1"][0] > 0.7
    assert (out / "accuracy.png").stat().st_size > 0
    loaded = MedusaHeads.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), heads.state_dict().values()))


def test_resume_equals_uninterrupted(tmp_path, tiny, monkeypatch):
    common = {"max_steps": 8, "warmup_ratio": 0.25, "checkpoint_every": 4, "log_every": 3, "eval_every": 3}
    full, full_out = _run(tmp_path, tiny, "full", **common)
    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 4)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, tiny, "resumed", **common)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    # A rerun without --resume must not silently throw the interrupted run away.
    with pytest.raises(checkpoints.CheckpointError, match="--resume to continue"):
        _run(tmp_path, tiny, "resumed", **common)
    resumed, resumed_out = _run(tmp_path, tiny, "resumed", resume=True, **common)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # The summary and metrics history a resumed run writes equal an uninterrupted run's (log windows span the cut).
    a, b = (json.loads((o / "training_summary.json").read_text()) for o in (full_out, resumed_out))
    assert a["tokens"] == b["tokens"] > 0 and a["target_tokens"] == b["target_tokens"] > 0
    for split in ("final_train", "final_heldout"):
        for metric in ("loss", "top1", "top5"):
            assert a[split][metric] == pytest.approx(b[split][metric], rel=1e-5), (split, metric)
    assert 0 < b["tokens_per_s"] < 10 * a["tokens_per_s"] and b["train_time_s"] > 0
    rows = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (full_out, resumed_out)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [3, 6, 8]
    assert [r["tokens"] for r in rows[0]] == [r["tokens"] for r in rows[1]]
    # Resuming a checkpoint of another config is refused.
    with pytest.raises(checkpoints.CheckpointError, match="another config"):
        _run(tmp_path, tiny, "resumed", max_steps=9, resume=True)


def test_zero_stages_agree_and_teacher_cache_is_exact(tmp_path, tiny):
    """One process, fp32: ZeRO 0/2/3 and the teacher cache must not change the math (2 epochs: cache is used)."""
    ref, _ = _run(tmp_path, tiny, "z0", max_steps=10, deepspeed={"zero_stage": 0})
    for name, extra in (
        ("z2", {"deepspeed": {"zero_stage": 2}}),
        ("z3", {"deepspeed": {"zero_stage": 3}}),
        ("cache", {"teacher_cache": True}),
        ("disk", {"teacher_cache": "disk"}),
    ):
        heads, out = _run(tmp_path, tiny, name, max_steps=10, **extra)
        for a, b in zip(ref.state_dict().values(), heads.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        assert MedusaHeads.from_pretrained(out).num_heads == 2


@pytest.mark.parametrize("train", [{"loss": "kl"}, {"loss": "kl", "kl_top_k": 8, "kl_temperature": 2.0}])
def test_kl_loss_learns(tmp_path, tiny, train):
    """The kl target is the base's own distribution (not the data tokens): its KL to the heads must fall."""
    heads, out = _run(tmp_path, tiny, "kl", max_steps=15, log_every=1, learning_rate=1e-2, **train)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/head0/loss"] < 0.7 * rows[0]["train/head0/loss"]


def test_kl_loss_matches_definition():
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    p = torch.softmax(teacher, -1)
    expected = (p * (p.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(losses.kl_loss(student, teacher), expected)
    assert losses.kl_loss(teacher, teacher) < 1e-6  # a student equal to the teacher has zero loss
    torch.testing.assert_close(losses.kl_loss(student, teacher, top_k=11), expected)
    v, i = teacher.topk(3, -1)
    q = torch.softmax(v, -1)  # top-3 teacher, renormalised, vs the student's full log-probs at those tokens
    manual = (q * (q.log() - torch.log_softmax(student, -1).gather(-1, i))).sum(-1).mean()
    torch.testing.assert_close(losses.kl_loss(student, teacher, top_k=3), manual)


def test_bad_config_exits_2_before_loading(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  name_or_path: /nonexistent\ntrain:\n  lerning_rate: 1\n")
    assert cli_main([str(cfg)]) == 2
    assert "did you mean 'train.learning_rate'" in capsys.readouterr().err.lower()
    assert cli_main([str(cfg), "--set", "train.lerning_rate=null", "--stages", "data,trian"]) == 2
    assert cli_main([str(tmp_path / "missing.yaml")]) == 2


def test_deepspeed_config_file(tmp_path):
    cfg = config_from_dict({"train": {"deepspeed": {"config_file": str(tmp_path / "nope.json")}}})
    with pytest.raises(trainer.TrainError, match="not found"):
        trainer.deepspeed_config(cfg)
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}))
    cfg = config_from_dict({"train": {"micro_batch_size": 3, "deepspeed": {"config_file": str(tmp_path / "ds.json")}}})
    ds = trainer.deepspeed_config(cfg)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 3


def test_two_ranks_identical_heads_written_once(tmp_path, tiny):
    model, data_run, _ = tiny
    cfg = tmp_path / "cfg.json"
    raw = base_config(model, max_steps=4, micro_batch_size=4, deepspeed={"zero_stage": 2})
    cfg.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(HERE / "train_two_ranks.py"),
        str(cfg),
        str(tmp_path / "run"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    heads_dir = tmp_path / "run" / "heads"
    assert json.loads((heads_dir / "training_summary.json").read_text())["world_size"] == 2
    assert res.stdout.count("[train] done") == 1 and res.stdout.count("[data] done") == 1
    assert sorted(p.name for p in heads_dir.iterdir()) == [
        "accuracy.png",
        "config.json",
        "manifest.json",
        "medusa_lm_head.safetensors",
        "metrics.jsonl",
        "training_summary.json",
    ]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A tiny model that ends its answers (EOS) after 1 to 40 tokens, and the data stage's artefact of it: sequences of
    unequal lengths (5 to 44 tokens)."""
    model, data_run = permutation_run(tmp_path_factory.mktemp("ragged"), ragged=True)
    return model, data_run, None


def test_tokens_weigh_equally_across_micro_batches(tmp_path, ragged):
    """Gradient accumulation 8 x 1 and 1 x 8 on unequal lengths train the same heads: the loss is normalised by the
    step's target-token count, not averaged per micro-batch (which gives a short sequence's tokens up to 8x the
    weight of a long one's)."""
    common = {"max_steps": 3, "learning_rate": 1e-2}
    one, _ = _run(tmp_path, ragged, "8x1", micro_batch_size=8, gradient_accumulation_steps=1, **common)
    accum, _ = _run(tmp_path, ragged, "1x8", micro_batch_size=1, gradient_accumulation_steps=8, **common)
    for (name, a), b in zip(one.state_dict().items(), accum.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_deepspeed_json_micro_batch_only_trains_every_sequence(tmp_path, tiny):
    """A JSON setting train_micro_batch_size_per_gpu (not train_batch_size): one epoch still sees all 40 sequences."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    _, out = _run(tmp_path, tiny, "micro4", max_steps=None, epochs=1.0, deepspeed={"config_file": str(ds)})
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_batch"] == 4 and summary["steps"] == 10
    assert summary["tokens"] == 40 * 44  # every training sequence once


def test_deepspeed_json_optimizer_gets_our_schedule(tmp_path, tiny):
    """A JSON `optimizer` without `scheduler` runs our warmup + cosine schedule, not a constant learning rate."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}))
    _, out = _run(tmp_path, tiny, "jsonopt", max_steps=4, log_every=1, deepspeed={"config_file": str(ds)})
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] < 1e-2 + 1e-12 and lrs[-1] < 0.5 * lrs[0], lrs  # cosine decay to min_lr_ratio 0


def test_no_weight_decay_on_biases(tmp_path, tiny):
    model, data_run, _ = tiny
    run = tmp_path / "wd"
    run.mkdir()
    os.symlink(data_run / "data", run / "data")
    s = trainer.setup(StageRun.prepare(config_from_dict(base_config(model, weight_decay=0.1)), run, "train"))
    groups = s.engine.optimizer.param_groups
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), (tuple(p.shape), g["weight_decay"])
    assert {p.dim() for g in groups for p in g["params"]} == {1, 2}


def test_disk_teacher_cache_survives_resume_and_is_rebuilt_only_for_new_data_or_base(tmp_path, tiny, monkeypatch):
    """teacher_cache: disk writes each sequence's hidden states once (epoch 1 + the first evals), a resumed run takes
    every batch from it (no base forward at all), the heads equal an uncached run's, and other inputs rebuild it."""
    common = {"max_steps": 10, "checkpoint_every": 3, "log_every": 3, "eval_every": 3}
    ref, _ = _run(tmp_path, tiny, "nocache", **common)
    # The disk runs read data made outside the stages: the data stage's rows without its manifest.
    shutil.copytree(tiny[1] / "data", tmp_path / "disk" / "data", ignore=shutil.ignore_patterns(MANIFEST))
    with monkeypatch.context() as m:
        _interrupt_after_checkpoint(m, 6)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, tiny, "disk", teacher_cache="disk", **common)
    cache = tmp_path / "disk" / "teacher_cache"
    assert int(torch.from_file(str(cache / "written.bin"), size=48, dtype=torch.uint8).sum()) == 48  # 40 + 8 held out
    heads, out = _run(tmp_path, tiny, "disk", teacher_cache="disk", resume=True, **common)
    for (name, a), b in zip(ref.state_dict().items(), heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads((out / "training_summary.json").read_text())["teacher_cache"]
    assert report["mode"] == "disk" and report["batches_through_base"] == 0 and report["batches_from_cache"] == 6
    assert report["sequences_cached"] == 48 and report["bytes"] >= 48 * 44 * 64 * 4  # fp32 rows, hidden size 64
    # Data without a data-stage manifest (made outside the stages): keyed on the data folder's content and the base,
    # so another learning rate reuses the cache.
    _, out = _run(tmp_path, tiny, "disk", teacher_cache="disk", max_steps=6, learning_rate=1e-2, eval_every=100)
    report = json.loads((out / "training_summary.json").read_text())["teacher_cache"]
    assert report["batches_through_base"] == 0 and report["batches_from_cache"] == 7
    summary = json.loads((out / "training_summary.json").read_text())
    assert len(summary["epoch_train_time_s"]) == 2

    def through_base(**train) -> int:
        _, out = _run(tmp_path, tiny, "disk", teacher_cache="disk", max_steps=6, eval_every=100, **train)
        return json.loads((out / "training_summary.json").read_text())["teacher_cache"]["batches_through_base"]

    # Data from the data stage: the cache is keyed on its content and the base only, so a learning-rate sweep reuses
    # it and new data rebuilds it.
    manifest = tmp_path / "disk" / "data" / "manifest.json"  # in the copy made above: removed below
    try:
        manifest.write_text(json.dumps({"artefact_hash": "a" * 64}))
        assert through_base(learning_rate=1e-2) == 6  # keyed differently from before: built once
        assert through_base(learning_rate=3e-2) == 0 and through_base(learning_rate=5e-3, epochs=2.0) == 0
        manifest.write_text(json.dumps({"artefact_hash": "b" * 64}))
        assert through_base(learning_rate=3e-2) == 6
    finally:
        manifest.unlink()


def test_zero3_partitioned_base_two_ranks_equals_one_rank(tmp_path, ragged):
    """Two CPU ranks, ZeRO-3: each rank holds about half of the frozen base, and the heads equal a one-rank ZeRO-0
    run on the same unequal-length data (2 ranks x micro 4 vs 1 rank x micro 8: the same tokens, the same weights)."""
    model, data_run, _ = ragged
    ds = tmp_path / "zero3.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}  # partition every parameter, however small
    ds.write_text(json.dumps({"zero_optimization": zero}))
    common = {"max_steps": 3, "learning_rate": 1e-2, "eval_every": 3}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(base_config(model, micro_batch_size=4, deepspeed={"config_file": str(ds)}, **common)))
    run = tmp_path / "z3"
    run.mkdir()
    os.symlink(data_run / "data", run / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(HERE / "train_two_ranks_zero3.py"), str(cfg), str(run)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in range(2):
        share = json.loads((tmp_path / f"share{r}.json").read_text())
        assert 0.4 < share["local"] / share["total"] < 0.6, share
        assert share["resident"] == 0, share
    z3 = MedusaHeads.from_pretrained(run / "heads")
    ref, _ = _run(tmp_path, ragged, "z0", micro_batch_size=8, deepspeed={"zero_stage": 0}, **common)
    for (name, a), b in zip(ref.state_dict().items(), z3.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_teacher_cache_decision_is_taken_by_all_ranks(tmp_path, tiny):
    """ZeRO-3, two ranks: a batch cached on one rank only goes through the (partitioned) base on both, and its hidden
    states are the base's (with a rank-local decision, rank 0 would skip the forward and rank 1 would hang)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, _, _ = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(HERE / "teacher_lockstep_two_ranks.py"), str(model), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        with torch.no_grad():
            want = base.get_decoder()(got["ids"]).last_hidden_state
        torch.testing.assert_close(got["hidden"], want, rtol=1e-5, atol=1e-5)


def test_wandb_run_gets_the_whole_config(tmp_path, tiny, monkeypatch):
    """The demo logs to wandb (offline without a key): the run must start with the config as a plain dict (the
    suite otherwise disables wandb, which hid a crash here)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = base_config(tiny[0])
    raw["logging"]["wandb_mode"] = "offline"
    cfg = config_from_dict(raw)
    run = trainer._wandb(cfg, tmp_path, "0123456789abcdef")
    try:
        assert run.config["heads"]["num_heads"] == cfg.heads.num_heads
        assert run.config["train"]["learning_rate"] == cfg.train.learning_rate
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_killed_builds_stale_lock_is_removed_before_it_can_hang_a_run(tmp_path, monkeypatch, capsys):
    """torch's FileBaton waits forever on a JIT-build lock a killed run left; old locks go, a live build's stays."""
    import os
    import time

    from medusa_toolkit import distributed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = [tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"]
    live = tmp_path / "being_built" / "lock"
    for lock in [*stale, live]:
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - distributed.STALE_BUILD_LOCK_S - 60
    for lock in stale:
        os.utime(lock, (old, old))
    assert sorted(distributed.clear_stale_build_locks()) == sorted(stale)
    assert live.exists() and not any(lock.exists() for lock in stale)
    assert "stale build lock" in capsys.readouterr().err
