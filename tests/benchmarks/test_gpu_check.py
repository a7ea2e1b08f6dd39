"""benchmarks/gpu_check.py (`make gpu-check`) cannot rot: its --cpu-dry-run runs every section's code path on the CPU
(tiny sizes, kernels in the Triton interpreter), and its exactness bookkeeping catches a wrong token."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa_toolkit.testing.tiny import tiny_base
from medusa_toolkit.verify.verifier import first_divergence

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--json", str(out), "--budget", "400"],
        cwd=tmp_path,  # not the repo root: our kernels/ folder must not be importable as a top-level package
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "== gpu-check summary (CPU DRY RUN" in run.stdout
    data = json.loads(out.read_text())
    sections = data["sections"]
    expected = ["env", "compile", "kernel", "variants", "speed", "e2e", "step", "train", "splits", "tiles"]
    assert [name for name in expected if sections.get(name, {}).get("status") != "ok"] == []
    assert sections["env"]["transformers_cache_api"] is True
    kernel = sections["kernel"]
    assert kernel["failed"] == 0 and kernel["ran"] == kernel["planned"] > 0
    assert {c["dtype"] for c in kernel["cases"]} >= {"float32", "bfloat16"}
    assert all(isinstance(c["sdpa"], float) and c["kernel"] <= c["tol"] for c in kernel["cases"])
    speed = sections["speed"]["rows"][0]
    assert speed["flash_decode_us"] > 0 and speed["sdpa_us"] > 0
    step = sections["step"]["rows"]
    assert [r["nodes"] for r in step] == [1, 4] and all(r["eager_ms"] > 0 and r["compiled_ms"] > 0 for r in step)
    e2e = sections["e2e"]
    fp32 = e2e["exactness"]["float32"]
    assert fp32["batch1"]["mismatch"] == fp32["batch1"]["tie"] == 0 and fp32["batch2"]["mismatch"] == 0
    assert e2e["exactness"]["bfloat16"]["batch2"]["mismatch"] == 0
    decoders = {r["decoder"] for r in e2e["speed"]["bfloat16"]["rows"]}
    assert {"base_greedy", "chain-2"} <= decoders
    train = sections["train"]
    assert (
        train["steps"] == 3 and train["tokens_per_s"] > 0 and ("deepspeed" in train["how"] or "torch" in train["how"])
    )
    assert sections["splits"]["rows"][0]["auto"] >= 1
    tiles = sections["tiles"]["rows"]
    assert tiles[0]["default"] and all(isinstance(r["us"], float) for r in tiles) and len(tiles) == 3
    assert data["summary"][0].startswith("== gpu-check summary") and data["elapsed_s"] < 400


def test_exactness_bookkeeping_catches_a_wrong_token(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script's section modules import each other by name
    gpu_check = importlib.import_module("gpu_check_e2e")
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None  # the verifier's, which gpu_check uses
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    base = tiny_base("llama", seed=3)
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        ref = base.generate(ids, do_sample=False, max_new_tokens=6)[0]
        logits = base(ref[None, :6]).logits[0, -1]
    assert gpu_check.classify(base, ref, ref.clone(), 4, "float32") == {"result": "exact"}
    worst = int(logits.argmin())  # sabotage: the least likely token where the reference has its argmax
    wrong = ref.clone()
    wrong[6] = worst
    verdict = gpu_check.classify(base, ref, wrong, 4, "float32")
    assert verdict["result"] == "mismatch" and verdict["position"] == 2 and verdict["logit_gap"] > 0.1
    assert gpu_check.classify(base, ref, ref[:8], 4, "float32")["result"] == "mismatch"  # stopped early


def test_checkout_imports_without_installing(tmp_path):
    # The GPU image has no medusa_toolkit installed: the script imports the checkout through a folder of links that
    # mirrors pyproject's package-dir mapping. Here: site-packages on the path, but not the editable install's hook.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; how = gpu_check.ensure_importable(); "
        "import medusa_toolkit.kernels.flash_decode as k, medusa_toolkit.train.losses as l; "
        "print(how); print(k.__file__); print(l.MedusaObjective.__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": site}
    run = subprocess.run(
        [sys.executable, "-S", "-c", code, str(SCRIPT.parent)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    how, kernels_file, objective = run.stdout.strip().splitlines()[-3:]
    assert how.startswith("from the checkout via") and objective == "MedusaObjective"
    assert Path(kernels_file).resolve() == (REPO / "kernels" / "flash_decode.py").resolve()
