"""`data.engine: openai`: self-distillation through a real OpenAI-compatible server (`transformers serve`, started on
127.0.0.1 by the test with a tiny model, stopped at the end) equals in-process greedy generation; the base behind it
writes its own prompts (data source `self`), filtered and counted as in-process; bad endpoints fail with one clear
line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.pipeline.stages import run_pipeline
from medusa_toolkit.testing.runs import base_config
from medusa_toolkit.testing.tiny import char_model_dir
from medusa_toolkit.train.data import openai_client
from medusa_toolkit.train.data.openai_client import OpenAIClient, ServerError
from medusa_toolkit.train.data.self_prompts import REASONS, PromptSampling, write_with_server
from medusa_toolkit.train.data.stage import base_model_metadata

pytest.importorskip("fastapi", reason="transformers serve needs the transformers[serving] extra (in the dev extras)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(folder, logs):
    """`transformers serve` pinned to the model in `folder` on a free local port; yields its endpoint."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    log = open(logs / "serve.log", "w")
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
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server of a tiny char-level chat model; yields (model folder, endpoint)."""
    folder = char_model_dir(tmp_path_factory.mktemp("served") / "model")
    with _serve(folder, tmp_path_factory.mktemp("log")) as endpoint:
        yield folder, endpoint


@pytest.fixture(scope="module")
def writer_served(tmp_path_factory):
    """The char-level chat model rewired to write words: every layer's output zeroed, embeddings one constant
    direction, and an untied lm_head reading it, so it samples a-j, spaces (2x a letter) and its end of turn (0.9x)
    whatever the context: prompts of a few words that end, sometimes too short or unfinished. The server loads it by
    its path. Yields (model folder, endpoint) of a server of it."""
    folder = char_model_dir(tmp_path_factory.mktemp("writer") / "model")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    weights = torch.full((vocab,), -30.0)
    weights[tok.convert_tokens_to_ids(list("abcdefghij"))] = 0.0
    weights[tok.convert_tokens_to_ids(" ")], weights[tok.eos_token_id] = math.log(2.0), math.log(0.9)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        head = torch.nn.Linear(hidden, vocab, bias=False)
        head.weight.zero_()
        head.weight[:, 0] = weights / hidden**0.5  # the final RMSNorm makes the one constant direction sqrt(hidden)
    model.lm_head = head
    model.config.tie_word_embeddings = False
    # transformers serve samples only where the model's generation config says so (a request's temperature > 0 does
    # not switch sampling on).
    model.generation_config.do_sample = True
    model.save_pretrained(folder)
    with _serve(folder, tmp_path_factory.mktemp("writer-log")) as endpoint:
        yield folder, endpoint


def _cfg(folder, prompts_file=None, **data):
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


SELF = {"source": "self", "temperature": 1.0, "top_p": 1.0, "max_tokens": 40}


def test_the_served_base_writes_its_own_prompts(writer_served, tmp_path, monkeypatch):
    """data.sources: [self] with data.engine: openai: prompts written through the server, filtered and counted as
    in-process, recorded in the summary (who wrote them, never a key), then answered through the same server."""
    folder, endpoint = writer_served
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written-anywhere")
    cfg = _cfg(folder, sources=[SELF], num_prompts=4, engine="openai", endpoint=endpoint, engine_model=str(folder),
               concurrency=1)  # fmt: skip
    run_pipeline(cfg, tmp_path / "run", ["data"])
    summary = json.loads((tmp_path / "run" / "data" / "data_summary.json").read_text())
    (source,) = summary["sources"]
    counts, written = source["self_prompts"], source["written_by"]
    assert 1 <= counts["kept"] <= 4 and summary["sequences_per_source"] == {"self": counts["kept"]}
    assert counts["sampled"] == counts["kept"] + sum(counts[r] for r in REASONS)
    assert counts["sampled"] - counts["kept"] - counts["surplus"] > 0  # the tiny model's text: filters really ran
    assert written["engine"] == "openai" and written["endpoint_host"] == endpoint.split("/")[2]
    assert written["requests"] == counts["sampled"] and written["seed_sent"]
    assert written["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 40, "seed": 0, "system_prompt": None}
    assert "sk-never-written-anywhere" not in json.dumps(summary)
    rows = datasets.load_from_disk(str(tmp_path / "run" / "data"))
    _, tok = base_model_metadata(str(folder))
    for row in rows:  # every kept prompt is one the served writer wrote (its alphabet), rendered as the user turn
        prompt = tok.decode(row["input_ids"][: row["prompt_length"]])
        assert re.fullmatch(r"<\|im_start\|>user\n[a-j]+( +[a-j]+){2,}<\|im_end\|>\n<\|im_start\|>assistant\n", prompt)


def test_engine_prompts_repeat_for_a_seed_where_the_server_honours_it(writer_served):
    """transformers serve seeds the whole process per request, so with one request in flight a seed gives the same
    prompts again and another seed other ones (with more in flight, or --continuous-batching, it does not)."""
    folder, endpoint = writer_served
    cfg = _cfg(folder, sources=[SELF], engine="openai", endpoint=endpoint, engine_model=str(folder), concurrency=1)
    model, tok = base_model_metadata(str(folder))
    engine = OpenAIClient(cfg, tok, [tok.convert_tokens_to_ids("<|im_end|>")])
    kw = {"system_prompt": None, "temperature": 1.0, "top_p": 1.0, "max_tokens": 40, "batch_size": 4,
          "fits": lambda text: True}  # fmt: skip
    a = write_with_server(engine, tok, 2, PromptSampling(seed=1, **kw))
    b = write_with_server(engine, tok, 2, PromptSampling(seed=1, **kw))
    c = write_with_server(engine, tok, 2, PromptSampling(seed=2, **kw))
    assert a == b and a != c
    assert engine.stats.requests == 3 * a[1]["sampled"] and not engine.refused


def test_engine_prompts_from_a_server_that_ignores_stop_or_seed(tmp_path):
    """Servers differ: one that keeps the end-of-turn text (ignoring `stop`) is cut there, one that answers 422 to
    `seed` is asked again without it (and the summary says no seed was sent), no choices count as an empty prompt."""
    import httpx

    folder = char_model_dir(tmp_path / "model")
    replies = iter(["abc de fg<|im_end|>hij", "abc de fg and more", None, "jj ii hh gg"])
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "seed" in body:
            return httpx.Response(422, text="Unexpected fields in the request: {'seed'}")
        bodies.append(body)
        text = next(replies)
        choices = [] if text is None else [{"text": text, "finish_reason": "length"}]
        return httpx.Response(200, json={"choices": choices})

    cfg = _cfg(folder, sources=[SELF], engine="openai", endpoint="http://engine.test/v1", concurrency=1)
    model, tok = base_model_metadata(str(folder))
    engine = OpenAIClient(cfg, tok, [tok.convert_tokens_to_ids("<|im_end|>")])
    engine.client = httpx.Client(transport=httpx.MockTransport(handler))
    how = PromptSampling(system_prompt=None, temperature=1.0, top_p=1.0, max_tokens=9, batch_size=4, seed=0,
                         fits=lambda text: True)  # fmt: skip
    kept, counts = write_with_server(engine, tok, 1, how)
    assert kept == ["abc de fg"] and engine.refused == {"seed"}
    assert (counts["sampled"], counts["kept"], counts["unfinished"], counts["empty"]) == (4, 1, 2, 1)
    assert all(b["stop"] == ["<|im_end|>"] and b["prompt"] == "<|im_start|>user\n" for b in bodies)


def test_unreachable_endpoint_and_unknown_model_are_clear_errors(served, tmp_path, monkeypatch):
    folder, endpoint = served
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi there!\n")
    monkeypatch.setattr(openai_client.time, "sleep", lambda s: None)  # the retries happen, without the waits
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = _cfg(folder, prompts, engine="openai", endpoint=f"http://127.0.0.1:{closed}/v1", num_prompts=1)
    with pytest.raises(ServerError, match="unreachable.*retries"):
        run_pipeline(cfg, tmp_path / "down", ["data"])
    cfg = _cfg(folder, sources=[SELF], engine="openai", endpoint=f"http://127.0.0.1:{closed}/v1", num_prompts=1)
    with pytest.raises(ServerError, match="unreachable.*retries"):  # self-written prompts: the same clear line
        run_pipeline(cfg, tmp_path / "down-self", ["data"])
    cfg = _cfg(folder, prompts, engine="openai", endpoint=endpoint, engine_model="no-such/model", num_prompts=1)
    with pytest.raises(ServerError, match="refused the request.*no-such/model"):
        run_pipeline(cfg, tmp_path / "wrong", ["data"])
