"""Data-stage throughput: response tokens/s of `data.engine: hf` (in-process generate()) vs `data.engine: openai`
against `transformers serve --continuous-batching`, same prompts, same machine, one run each.

The server is started here on 127.0.0.1 (continuous batching, CPU, float32, a bounded KV cache) and stopped at the
end. On a GPU cluster the engine would be vLLM or SGLang; this measures the client and the plumbing on what this
machine has.

  python benchmarks/bench_engine_throughput.py --prompts 32 --new 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from medusa_toolkit.config import config_from_dict
from medusa_toolkit.model.base_model import resolve_model_path
from medusa_toolkit.pipeline.stages import run_pipeline


def data_tokens_per_s(cfg, run_dir: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    run_pipeline(cfg, run_dir, ["data"], log=lambda *a: None)
    seconds = time.perf_counter() - start
    summary = json.loads((run_dir / "data" / "data_summary.json").read_text())
    return summary["response_tokens"] / seconds, summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    folder = resolve_model_path(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder, "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu", "--dtype", "float32", "--continuous-batching", "--cb-num-blocks", "128",
           "--cb-max-batch-tokens", "1024"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("transformers serve did not start (pip install 'transformers[serving]')")
                time.sleep(0.5)
        data = {"sources": [{"source": "chitchat"}], "num_prompts": args.prompts, "max_new_tokens": args.new,
                "batch_size": args.concurrency, "eval_fraction": 0.0}  # fmt: skip
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in (
                ("hf", {}),
                ("openai (transformers serve, continuous batching)", {"engine": "openai", "concurrency": args.concurrency,
                 "endpoint": f"http://127.0.0.1:{port}/v1", "engine_model": folder}),
            ):  # fmt: skip
                cfg = config_from_dict({"model": {"name_or_path": args.model}, "data": {**data, **extra},
                                        "logging": {"progress": False}})  # fmt: skip
                tps, summary = data_tokens_per_s(cfg, Path(tmp) / name.split()[0])
                rows.append((name, tps, summary.get("engine", {})))
        print(f"{args.prompts} chitchat prompts x <= {args.new} new tokens, greedy, float32")
        for name, tps, _ in rows:
            print(f"{name:<52} {tps:8.1f} response tokens/s  {tps / rows[0][1]:5.2f}x")
        e = rows[1][2]
        print(f"engine: {e.get('requests')} requests, {e.get('retokenized')} re-tokenized, "
              f"{e.get('retokenization_mismatch')} disagreeing with the server's token count")  # fmt: skip
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
