"""The verifier passes correct Medusa decoding, catches broken decoding, and classifies ties; reports follow the schema."""

from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from medusa_toolkit.decoding import generate
from medusa_toolkit.testing.tiny import BRANCHING, fitted
from medusa_toolkit.verify.report import junit_xml, validate_report, write_json, write_junit
from medusa_toolkit.verify.verifier import classify_divergence, decide, default_tie_tolerance, verify_heads

NEW = 24


@pytest.fixture(scope="module")
def tiny():
    """A tiny base with quickly fitted heads, and prompts on its greedy corpus (so heads accept several tokens).

    Sharpened attention (as in trained models), so an off-by-one position really changes tokens."""
    model, corpus = fitted("llama", seed=0, steps=40, sharpen=True)
    return model, [corpus[i, :8].tolist() for i in range(2)]


def run(model, prompts, tree="mc_sim_7b_63", attn_implementation="sdpa", **kw):
    return verify_heads(
        model,
        None,
        prompts,
        tree=tree,
        max_new_tokens=NEW,
        attn_implementation=attn_implementation,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("tree", ["chain-4", BRANCHING, "mc_sim_7b_63"], ids=["chain-4", "branching", "mc_sim_7b_63"])
def test_passes_on_correct_decoding(tiny, tree):
    model, prompts = tiny
    report = run(model, prompts, tree)
    assert report.exit_code == 0 and report.passed
    s = report.summary
    assert (s["passed"], s["ties"], s["mismatches"], s["errors"]) == (2, 0, 0, 0)
    assert s["medusa_tokens"] == s["reference_tokens"] == 2 * NEW
    # The heads really accept several tokens per step, so the sabotage tests below exercise multi-token steps.
    assert s["mean_accept_length"] > 1.5
    assert sum(int(k) * v for k, v in s["accept_length_histogram"].items()) == sum(
        sum(p.accept_lengths) for p in report.prompts
    )
    assert [h["offset"] for h in s["head_accuracy"]] == [2, 3, 4, 5]
    assert s["head_accuracy"][0]["top1"] > 0.5 and all(h["top5"] >= h["top1"] for h in s["head_accuracy"])
    assert validate_report(report.to_dict()) == []


@pytest.mark.parametrize("attn", ["eager", "medusa_flash_decoding"])
def test_passes_with_each_attention(tiny, attn):
    model, prompts = tiny
    report = run(model, prompts[:1], attn_implementation=attn)
    assert report.exit_code == 0 and report.summary["passed"] == 1
    assert report.settings["attn_implementation"] == attn and report.summary["mean_accept_length"] > 1.5


# ----------------------------------------------------------------------------------------------------------------------
# Sabotaged decoding must be caught


def sibling_mask(attn, buffers, lens, dtype):
    """Bug: nodes at the same depth see each other (siblings leak into each other's attention), for every attention."""
    depth = buffers.position_offsets
    leaky = dataclasses.replace(buffers, attn_mask=buffers.attn_mask | (depth[:, None] == depth[None, :]))
    return ORIGINAL["attn_inputs"](attn, leaky, lens, dtype)


def off_by_one_verify(model, tree_tokens, buffers, cache, attn):
    """Bug: tree tokens get position ids one too far."""
    shifted = dataclasses.replace(buffers, position_offsets=buffers.position_offsets + 1)
    return ORIGINAL["verify_tree"](model, tree_tokens, shifted, cache, attn)


def no_compaction(cache, nodes, counts):
    """Bug: the cache keeps the first tree nodes in node order instead of moving the accepted path into place."""
    cache.set_lens(cache.lens + counts)


ORIGINAL = {name: getattr(generate, name) for name in ("attn_inputs", "verify_tree", "commit")}
SABOTAGE = {"attn_inputs": sibling_mask, "verify_tree": off_by_one_verify, "commit": no_compaction}


@pytest.mark.parametrize("name", list(SABOTAGE))
def test_catches_broken_decoding(tiny, name, monkeypatch, tmp_path):
    model, prompts = tiny
    monkeypatch.setattr(generate, name, SABOTAGE[name])
    report = run(model, prompts)
    check_caught(report, tmp_path)


def test_catches_leaky_mask_in_flash_decoding(tiny, monkeypatch, tmp_path):
    model, prompts = tiny
    monkeypatch.setattr(generate, "attn_inputs", sibling_mask)
    check_caught(run(model, prompts, attn_implementation="medusa_flash_decoding"), tmp_path)


def check_caught(report, tmp_path):
    assert report.exit_code == 1 and not report.passed
    assert report.summary["mismatches"] >= 1 and report.verdict["status"] == "fail"
    bad = [p for p in report.prompts if p.status == "mismatch"]
    d = bad[0].divergence
    # The sabotage really changed a token, and the reference did not consider it a near tie.
    assert d.kind == "mismatch" and d.candidate_token["id"] != d.reference_token["id"]
    assert d.gap > d.tolerance and 0 <= d.position < NEW

    # The same outcome in the CI artefacts.
    data = json.loads(write_json(report, tmp_path / "report.json").read_text())
    assert validate_report(data) == []
    assert data["verdict"]["exit_code"] == 1 and data["summary"]["mismatches"] == len(bad)
    suite = ET.parse(write_junit(report, tmp_path / "junit.xml")).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == 2
    assert int(suite.get("failures")) == len(bad) == sum(c.find("failure") is not None for c in cases)
    assert all(f.get("type") == "MISMATCH" for c in cases for f in c.findall("failure"))


def test_ties_pass_unless_strict(tiny, monkeypatch):
    """Broken positions with an enormous tolerance: every divergence is a 'tie' -> exit 0, but 1 under --strict."""
    model, prompts = tiny
    monkeypatch.setattr(generate, "verify_tree", off_by_one_verify)
    report = run(model, prompts[:1], tie_tolerance=1e9)
    assert report.summary["ties"] == 1 and report.prompts[0].divergence.kind == "tie"
    assert report.exit_code == 0
    suite = junit_xml(report).getroot().find("testsuite")
    assert suite.get("failures") == "0" and "tie" in suite.find("testcase/system-out").text
    assert decide(report.summary, strict=True)["exit_code"] == 1
    assert junit_xml(report, strict=True).getroot().find("testsuite").get("failures") == "1"


def test_min_accept_length_gate(tiny):
    model, prompts = tiny
    report = run(model, prompts[:1], tree="chain-2", min_accept_length=100.0)
    assert report.summary["mismatches"] == 0 and report.exit_code == 3
    assert report.verdict["status"] == "low_acceptance"
    suite = junit_xml(report).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert decide(report.summary, min_accept_length=1.0)["exit_code"] == 0


def test_batched_medusa_is_verified_against_single_prompt_references(tiny):
    model, prompts = tiny
    report = run(model, [prompts[0], prompts[1][:3], prompts[0][:5]], tree="chain-4", batch_size=2)
    assert report.exit_code == 0 and report.settings["batch_size"] == 2
    assert report.summary["mismatches"] == 0 and report.summary["mean_accept_length"] > 1.5
    assert any("batches of 2" in n for n in report.notes)


def test_batched_sabotage_is_caught(tiny, monkeypatch):
    """A batched decoder that gives every row the first row's positions must fail verification."""
    model, prompts = tiny
    real = generate.medusa_generate_batch

    def broken(model, input_ids, attention_mask, *args, **kwargs):
        return real(model, input_ids, torch.ones_like(attention_mask), *args, **kwargs)  # padding treated as text

    monkeypatch.setattr(generate, "medusa_generate_batch", broken)
    report = run(model, [prompts[0], prompts[1][:3], prompts[0][:5]], tree="chain-4", batch_size=3)
    assert report.exit_code == 1 and report.summary["mismatches"] >= 1


# ----------------------------------------------------------------------------------------------------------------------
# Tie classification on constructed logits


def test_classify_exact_tie():
    kind, margin, gap = classify_divergence(torch.tensor([5.0, 5.0, 1.0]), 0, 1, tolerance=1e-4)
    assert (kind, margin, gap) == ("tie", 0.0, 0.0)
    assert classify_divergence(torch.tensor([5.0, 5.0, 1.0]), 0, 1, tolerance=0.0)[0] == "tie"


def test_classify_near_tie():
    logits = torch.tensor([3.0, 3.0 - 5e-5, -2.0])
    kind, margin, gap = classify_divergence(logits, 0, 1, tolerance=default_tie_tolerance("float32"))
    assert kind == "tie" and margin == pytest.approx(5e-5, rel=1e-2) and gap == pytest.approx(5e-5, rel=1e-2)
    assert classify_divergence(logits, 0, 1, tolerance=1e-6)[0] == "mismatch"
    # A gap of 0.3 is noise in bfloat16 but a real mismatch in float32.
    wide = torch.tensor([10.0, 9.7])
    assert classify_divergence(wide, 0, 1, default_tie_tolerance(torch.bfloat16))[0] == "tie"
    assert classify_divergence(wide, 0, 1, default_tie_tolerance("float32"))[0] == "mismatch"


def test_classify_clear_mismatch():
    kind, margin, gap = classify_divergence(torch.tensor([5.0, 3.0, 1.0]), 0, 1, tolerance=1e-4)
    assert (kind, margin, gap) == ("mismatch", 2.0, 2.0)
    # The top-2 margin is a tie, but the candidate took the 3rd token: not a tie.
    kind, margin, gap = classify_divergence(torch.tensor([5.0, 5.0, 1.0]), 0, 2, tolerance=1e-4)
    assert (kind, margin, gap) == ("mismatch", 0.0, 4.0)
    # The candidate stopped early (no token there).
    kind, _, gap = classify_divergence(torch.tensor([5.0, 3.0]), 0, None, tolerance=1e9)
    assert kind == "mismatch" and math.isinf(gap)


def test_default_tolerances_order():
    assert default_tie_tolerance("float32") < default_tie_tolerance("float16") < default_tie_tolerance("bfloat16")


def test_validate_report_flags_problems():
    assert validate_report({"schema_version": 1}) != []
    bad = {"schema_version": 3, "tool": "x"}
    errors = validate_report(bad)
    assert any("schema_version" in e for e in errors) and any("missing key 'prompts'" in e for e in errors)
