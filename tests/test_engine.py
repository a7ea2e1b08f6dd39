"""`data.engine: openai`: self-distillation through a real OpenAI-compatible server (`transformers serve`, started on
127.0.0.1 by the test with a tiny model, stopped at the end) equals in-process greedy generation; bad endpoints fail
with one clear line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import datasets
import pytest
from tiny import char_model_dir
from train_helpers import base_config

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.stages import run_pipeline
from medusa_toolkit.train import engine as engine_mod
from medusa_toolkit.train.engine import EngineError

pytest.importorskip("fastapi", reason="transformers serve needs the transformers[serving] extra (in the dev extras)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve` pinned to a tiny char-level chat model; yields (model folder, endpoint)."""
    folder = char_model_dir(tmp_path_factory.mktemp("served") / "model")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, f"transformers serve died: see {log.name}"
                assert time.time() < deadline, "transformers serve did not come up within 120 s"
                time.sleep(0.2)
        yield folder, f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def _cfg(folder, prompts_file, **data):
    raw = base_config(folder)
    settings = {"sources": [{"source": "file", "path": str(prompts_file)}], "num_prompts": 6, "max_new_tokens": 24,
                "max_prompt_tokens": 200, "eval_fraction": 0.0}  # fmt: skip
    raw["data"].update({**settings, **data})
    return config_from_dict(raw)


def test_engine_greedy_equals_in_process_greedy(served, tmp_path, monkeypatch):
    folder, endpoint = served
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi there!\nWhat is 2+2?\nName three colours.\nok\nCount to five.\nWhy is the sky blue?\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written-anywhere")
    run_pipeline(_cfg(folder, prompts), tmp_path / "hf", ["data"])
    run_pipeline(_cfg(folder, prompts, engine="openai", endpoint=endpoint, engine_model=str(folder), concurrency=3),
                 tmp_path / "engine", ["data"])  # fmt: skip
    hf, served_ds = (datasets.load_from_disk(str(tmp_path / r / "data")) for r in ("hf", "engine"))
    assert served_ds["input_ids"] == hf["input_ids"] and served_ds["loss_mask"] == hf["loss_mask"]
    summary = json.loads((tmp_path / "engine" / "data" / "data_summary.json").read_text())
    e = summary["engine"]
    assert e["engine"] == "openai" and e["endpoint_host"] == endpoint.split("/")[2] and e["requests"] == 6
    assert e["retokenized"] == 6 and e["retokenization_mismatch"] == 0 and e["prompt_roundtrip_mismatch"] == 0
    assert "sk-never-written-anywhere" not in json.dumps(summary)


def test_unreachable_endpoint_and_unknown_model_are_clear_errors(served, tmp_path, monkeypatch):
    folder, endpoint = served
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi there!\n")
    monkeypatch.setattr(engine_mod.time, "sleep", lambda s: None)  # the retries happen, without the waits
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = _cfg(folder, prompts, engine="openai", endpoint=f"http://127.0.0.1:{closed}/v1", num_prompts=1)
    with pytest.raises(EngineError, match="unreachable.*retries"):
        run_pipeline(cfg, tmp_path / "down", ["data"])
    cfg = _cfg(folder, prompts, engine="openai", endpoint=endpoint, engine_model="no-such/model", num_prompts=1)
    with pytest.raises(EngineError, match="refused the request.*no-such/model"):
        run_pipeline(cfg, tmp_path / "wrong", ["data"])
