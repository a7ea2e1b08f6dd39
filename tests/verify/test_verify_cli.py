"""`medusa-verify` end to end on the offline SmolLM2-135M, and its exit code 2 on bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from medusa_toolkit import MedusaHeads, load_base_model
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.verify.cli import main
from medusa_toolkit.verify.report import validate_report

BASE = "smollm2-135m-instruct"


# SmolLM2 is big enough for `model.compile: auto` to compile its step: minutes on two cores, which the suite cannot
# spend per test (tests/decoding/test_compiled.py checks the compiled step on tiny models; `make demo` on SmolLM2).
EAGER = ["--compile", "off"]


@pytest.fixture(scope="module")
def smol_heads(tmp_path_factory):
    """Fresh heads for SmolLM2 (each a copy of its lm_head), saved like a training run saves them."""
    base, _ = load_base_model(BASE)
    heads = MedusaHeads(576, 49152, 3, base_model_name_or_path=BASE)
    heads.init_from_lm_head(base.lm_head.weight)
    return str(heads.save_pretrained(tmp_path_factory.mktemp("smol") / "heads"))


def test_cli_end_to_end_smollm2(smol_heads, tmp_path, capsys):
    report, junit, tree = tmp_path / "report.json", tmp_path / "junit.xml", tmp_path / "tree.json"
    tree.write_text(json.dumps({"name": "small-branching", "paths": [[0], [1], [0, 0], [1, 0], [0, 0, 0]]}))
    # CPU-sized: a few tokens per prompt still run the whole reference / Medusa / tie-check / report path.
    argv = ["--base", BASE, "--heads", smol_heads, "--prompts", "builtin", "--num-prompts", "2", "--max-new-tokens",
            "8", "--attn", "sdpa", "--tree", str(tree), "--report", str(report), "--junit", str(junit),
            "--no-progress", *EAGER]  # fmt: skip
    assert main(argv) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert validate_report(data) == []
    assert data["summary"]["prompts"] == 2 and data["summary"]["mismatches"] == 0
    assert data["summary"]["medusa_tokens"] == data["summary"]["reference_tokens"] > 0
    assert data["settings"]["tree"]["name"] == "small-branching" and len(data["summary"]["head_accuracy"]) == 3
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0" and len(suite.findall("testcase")) == 2


def test_cli_subprocess(smol_heads, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medusa_toolkit.verify.cli", "--base", BASE, "--heads", smol_heads, "--prompts",
           "builtin", "--num-prompts", "1", "--max-new-tokens", "4", "--attn", "sdpa", "--tree", "chain-2",
           "--min-accept-length", "1.0", "--junit", str(tmp_path / "j.xml"), *EAGER]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verdict: PASS" in proc.stdout
    ET.parse(tmp_path / "j.xml")


def _usage_error(argv, capsys, *needles):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err


def test_missing_prompts_file(smol_heads, tmp_path, capsys):
    _usage_error(["--base", BASE, "--heads", smol_heads, "--prompts", str(tmp_path / "nope.jsonl")], capsys,
                 "prompts file not found", "nope.jsonl")  # fmt: skip


def test_empty_prompt_list(smol_heads, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _usage_error(["--base", BASE, "--heads", smol_heads, "--prompts", str(empty)], capsys, "no prompts")


def test_wrong_prompt_field(smol_heads, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hi"}\n')
    _usage_error(["--base", BASE, "--heads", smol_heads, "--prompts", str(rows)], capsys, "no field 'prompt'")


def test_missing_heads_and_too_deep_tree(smol_heads, tmp_path, capsys):
    _usage_error(["--base", BASE, "--heads", str(tmp_path / "no-heads")], capsys, "heads folder not found")
    _usage_error(["--base", BASE, "--heads", smol_heads, "--tree", "chain-5"], capsys, "depth 5", "chain-3")


def test_heads_for_another_base(tmp_path, capsys):
    other = MedusaHeads(64, 256, 2).save_pretrained(tmp_path / "tiny-heads")
    _usage_error(["--base", BASE, "--heads", str(other)], capsys, "heads do not fit this base model", "hidden_size=64")


def test_bad_numbers(capsys):
    _usage_error(
        ["--base", BASE, "--heads", "x/y", "--max-new-tokens", "0"], capsys, "--max-new-tokens", "must be >= 1"
    )
    _usage_error(["--base", BASE, "--heads", "x/y", "--tie-tolerance", "-1"], capsys, "--tie-tolerance", "must be >= 0")


def test_verify_stage(smol_heads, tmp_path):
    """The pipeline's verify stage: heads from run_dir/heads, the tuned tree from run_dir/tree/tree.json."""
    import shutil

    from medusa_toolkit.config import config_from_dict
    from medusa_toolkit.verify.verifier import run_verify

    run_dir, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(smol_heads, run_dir / "heads")
    (run_dir / "tree").mkdir()
    (run_dir / "tree" / "tree.json").write_text(json.dumps({"name": "tuned", "paths": [[0], [1], [0, 0]]}))
    out.mkdir()
    cfg = config_from_dict(
        {
            "model": {"name_or_path": BASE},
            "verify": {"prompts": "builtin", "num_prompts": 1, "max_new_tokens": 4, "attn_implementation": "sdpa"},
            "logging": {"progress": False},
        }
    )
    run_verify(StageRun.prepare(cfg, run_dir, "verify", out))
    data = json.loads((out / "report.json").read_text())
    assert validate_report(data) == [] and data["verdict"]["exit_code"] == 0
    assert data["settings"]["tree"]["name"] == "tuned" and data["settings"]["tree"]["num_nodes"] == 4
    assert ET.parse(out / "junit.xml").getroot().find("testsuite").get("tests") == "1"


def test_sampling_check_through_the_cli(tmp_path, capsys):
    """`--sampling` runs the distribution test: the lossless sampler passes; a bad spec is a usage error (exit 2)."""
    import torch

    from medusa_toolkit.testing.tiny import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    base = load_base_model(str(model_dir))[0]
    with torch.no_grad():  # a random init is nearly uniform; a peaked one gives the chi-square test categories
        base.lm_head.weight.mul_(8)
    base.save_pretrained(model_dir)
    heads = MedusaHeads(64, 258, 2)
    with torch.no_grad():
        heads.init_from_lm_head(base.lm_head.weight)
    heads.save_pretrained(tmp_path / "heads")
    common = ["--base", str(model_dir), "--heads", str(tmp_path / "heads"), "--prompts", "builtin", "--num-prompts", "1",
              "--no-progress", "--tree", "chain-2"]  # fmt: skip
    assert main([*common, "--sampling", "temperature=lots"]) == 2
    assert "temperature" in capsys.readouterr().err
    report = tmp_path / "sampling.json"
    code = main([*common, "--sampling", "temperature=1.0", "--samples", "300", "--sampling-tokens", "1",
                 "--report", str(report)])  # fmt: skip
    out = capsys.readouterr().out
    result = json.loads(report.read_text())["sampling_check"]
    assert code == (0 if result["passed"] else 1) and "p" in out
    assert result["passed"], out
