"""Export: both package layouts compute the same function as the heads, match the engines' specs, and load back;
upstream checkpoints (folder, legacy .pt via weights_only) import; packages are written atomically."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa_toolkit import MedusaHeads, MedusaModel
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.export import package as package_mod
from medusa_toolkit.export.cli import main as export_main
from medusa_toolkit.export.package import ExportInputs, export_packages
from medusa_toolkit.export.stage import ExportError, ExportRequest, gather_inputs, run_export
from medusa_toolkit.model.heads import HeadsLoadError
from medusa_toolkit.pipeline.stages import StageRun

H, V = 64, 256


def random_heads(head_type: str, num_heads: int = 3, num_layers: int = 2, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(H, V, num_heads, num_layers, head_type=head_type, base_model_name_or_path="org/base")
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)  # non-zero W and bias: a layout bug (dropped bias, swapped layer) changes logits
    return heads.eval()


@pytest.fixture(scope="module")
def lm_head() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(H, V, bias=False).requires_grad_(False)


@pytest.mark.parametrize("head_type", ["per_head_lm_head", "shared_lm_head"])
def test_round_trip_identical_logits_both_formats(tmp_path, lm_head, head_type):
    heads = random_heads(head_type)
    inputs = ExportInputs(heads, base_model="org/base", lm_head_weight=lm_head.weight, license="apache-2.0")
    folders = export_packages(inputs, tmp_path, "all")
    assert set(folders) == {"medusa", "vllm"}
    hidden = torch.randn(2, 7, H)
    with torch.no_grad():
        expected = heads(hidden, lm_head)
        for fmt, folder in folders.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # our own packages must load without config/weights disagreement
                loaded = MedusaHeads.from_pretrained(folder)
            assert loaded.head_type == head_type, fmt
            assert (loaded.num_heads, loaded.num_layers) == (3, 2)
            assert torch.equal(loaded(hidden, lm_head), expected), fmt
    # The medusa layout always carries a projection per head (TGI / TensorRT-LLM need one): for shared heads, a copy
    # of the base lm_head. Loaded as plain per-head weights it still computes the same logits.
    tensors = load_file(folders["medusa"] / "medusa_lm_head.safetensors")
    for i in range(3):
        assert torch.equal(
            tensors[f"{i}.2.weight"], heads.heads[i][2].weight if head_type == "per_head_lm_head" else lm_head.weight
        )
    plain = MedusaHeads.from_pretrained(folders["medusa"])
    assert torch.allclose(plain(hidden, lm_head), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(plain(hidden, lm_head).argmax(-1), expected.argmax(-1))


def test_key_layouts_and_configs_match_specs(tmp_path, lm_head):
    per = export_packages(ExportInputs(random_heads("per_head_lm_head")), tmp_path / "per", "all")
    shared = export_packages(
        ExportInputs(random_heads("shared_lm_head"), lm_head_weight=lm_head.weight), tmp_path / "sh", "all"
    )
    blocks = {f"{i}.{j}.linear.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    for folders in (per, shared):
        assert set(load_file(folders["medusa"] / "medusa_lm_head.safetensors")) == blocks | {
            f"{i}.2.weight" for i in range(3)
        }
        cfg = json.loads((folders["medusa"] / "config.json").read_text())
        assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 2
        assert (cfg["hidden_size"], cfg["vocab_size"], cfg["base_model_name_or_path"]) == (H, V, "org/base")
    vllm_blocks = {f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    assert set(load_file(per["vllm"] / "model.safetensors")) == vllm_blocks | {f"lm_heads.{i}.weight" for i in range(3)}
    assert set(load_file(shared["vllm"] / "model.safetensors")) == vllm_blocks | {"lm_heads.0.weight"}
    for folders, original in ((per, False), (shared, True)):
        cfg = json.loads((folders["vllm"] / "config.json").read_text())
        assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
        assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["num_hidden_layers"]) == (H, V, 3, 2)
        assert cfg["truncated_vocab_size"] is None and cfg["medusa_fc_bias"] is True
        assert cfg["original_lm_head"] is original
        # vLLM's MedusaConfig.from_pretrained renames any key with 'num'+'heads' / 'num'+'layers': only ours may exist.
        assert [k for k in cfg if "num" in k and ("heads" in k or "layers" in k)] == ["num_heads", "num_hidden_layers"]
    card = (per["medusa"] / "README.md").read_text()
    assert card.startswith("---\n") and "speculative-decoding" in card and "base_model: org/base" in card
    assert '"method": "medusa"' in card and "--num_medusa_heads 3" in card and "--model-id" in card
    assert "Not verified" in card


def test_upstream_folder_with_wrong_config_and_legacy_pt(tmp_path, lm_head):
    heads = random_heads("per_head_lm_head", num_heads=4, num_layers=1).half()
    upstream = {f"medusa_head.{k.removeprefix('heads.')}": v.clone() for k, v in heads.state_dict().items()}
    folder = tmp_path / "upstream"
    folder.mkdir()
    save_file(upstream, str(folder / "medusa_lm_head.safetensors"))
    # Upstream Hub configs under-count heads (medusa-vicuna-7b says 2 for 4 heads): the weights win, with a warning.
    (folder / "config.json").write_text(
        json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"})
    )
    hidden = torch.randn(3, H)
    expected = heads.float()(hidden)
    with pytest.warns(UserWarning, match="medusa_num_heads=2 but the weights hold 4"):
        loaded = MedusaHeads.from_pretrained(folder)
    assert loaded.num_heads == 4 and torch.equal(loaded(hidden), expected)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({k.removeprefix("heads."): v for k, v in heads.state_dict().items()}, legacy / "medusa_lm_head.pt")
    assert torch.equal(MedusaHeads.from_pretrained(legacy)(hidden), expected)
    assert torch.equal(MedusaHeads.from_pretrained(legacy / "medusa_lm_head.pt")(hidden), expected)


class _Payload:
    """Unpickling this would create a marker file: proof that a .pt was (not) unpickled with arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_legacy_pt_with_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / "medusa_lm_head.pt", "wb") as f:
        pickle.dump({"0.0.linear.weight": _Payload(marker)}, f)
    with pytest.raises(HeadsLoadError, match="weights_only"):
        MedusaHeads.from_pretrained(bad)
    assert not marker.exists()


def test_vllm_import_warns_on_config_mismatch_and_model_loads_it(tmp_path, lm_head):
    heads = random_heads("per_head_lm_head")
    vllm = export_packages(ExportInputs(heads), tmp_path, "vllm")["vllm"]
    cfg = json.loads((vllm / "config.json").read_text())
    (vllm / "config.json").write_text(json.dumps(dict(cfg, num_heads=5)))
    with pytest.warns(UserWarning, match="num_heads=5 but the weights hold 3"):
        loaded = MedusaHeads.from_pretrained(vllm)
    assert loaded.num_heads == 3

    class Base(torch.nn.Module):  # the smallest base MedusaModel accepts: only the lm_head matters here
        def __init__(self):
            super().__init__()
            self.lm_head = lm_head

        def get_output_embeddings(self):
            return self.lm_head

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MedusaModel.from_pretrained(base=Base(), heads=str(vllm))
    hidden = torch.randn(4, H)
    assert torch.equal(model.heads(hidden, lm_head), heads(hidden, lm_head))


def test_shared_heads_need_the_base(tmp_path):
    heads = random_heads("shared_lm_head")
    heads.config.base_model_name_or_path = None
    with pytest.raises(ExportError, match="--base-model"):
        gather_inputs(ExportRequest(heads, include_tokenizer=False))
    with pytest.raises(ValueError, match="lm_head"):
        export_packages(ExportInputs(heads), tmp_path, "medusa")


def test_export_is_atomic(tmp_path, monkeypatch):
    heads = random_heads("per_head_lm_head")
    export_packages(ExportInputs(heads), tmp_path, "all")
    before = (tmp_path / "medusa" / "medusa_lm_head.safetensors").read_bytes()

    def boom(info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(package_mod, "build_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_packages(ExportInputs(random_heads("per_head_lm_head", seed=1)), tmp_path, "all")
    assert (tmp_path / "medusa" / "medusa_lm_head.safetensors").read_bytes() == before  # old package intact
    # no half-written temp folder left (only the packages and the record of what medusa-export wrote)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".medusa-export.json", "medusa", "vllm"]


def bound_settings(heads: MedusaHeads, tree: dict | None) -> dict:
    """The report settings that name exactly these heads and this tree (what medusa-verify writes)."""
    from medusa_toolkit.model.tree import MedusaTree, tree_digest

    tree_sha = tree_digest(MedusaTree.from_paths(tree["paths"], top_k=tree.get("top_k"))) if tree else None
    return {"heads_sha256": heads.content_digest(), "tree_sha256": tree_sha}


def _fake_run(run_dir: Path) -> MedusaHeads:
    heads = random_heads("per_head_lm_head")
    heads.save_pretrained(run_dir / "heads")
    (run_dir / "heads" / "training_summary.json").write_text(json.dumps({"steps": 10, "final_loss": 1.5}))
    (run_dir / "tree").mkdir()
    tree = {"name": "tuned", "paths": [[0], [1], [0, 0]], "top_k": 2}
    tree["acceptance"] = {"head_rank_accuracy": [[0.7, 0.1], [0.4, 0.2], [0.2, 0.1]]}  # as the tree stage writes it
    (run_dir / "tree" / "tree.json").write_text(json.dumps(tree))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(run_dir / "tree" / "tree.png")
    plt.close()
    (run_dir / "verify").mkdir()
    report = {  # medusa-verify's report.json schema (verify/report.py), naming the heads and tree it verified
        "schema_version": 2,
        "settings": bound_settings(heads, tree),
        "verdict": {"status": "pass", "passed": True, "exit_code": 0, "reasons": []},
        "summary": {"prompts": 8, "passed": 8, "mismatches": 0, "mean_accept_length": 2.25,
                    "head_accuracy": [{"head": 0, "offset": 2, "top1": 0.7, "top5": 0.9, "count": 10}]},
        "prompts": [{"index": 0, "accept_lengths": list(range(500))}],
    }  # fmt: skip
    (run_dir / "verify" / "report.json").write_text(json.dumps(report))
    (run_dir / "config.resolved.yaml").write_text("model:\n  name_or_path: org/base\n")
    return heads


def test_stage_packages_run_artefacts(tmp_path):
    run_dir = tmp_path / "run"
    heads = _fake_run(run_dir)
    cfg = config_from_dict({"model": {"name_or_path": "org/base"}, "export": {"include_tokenizer": False}})
    out = tmp_path / ".export.tmp"
    run_export(StageRun.prepare(cfg, run_dir, "export", out))
    medusa = out / "medusa"
    names = {str(p.relative_to(medusa)) for p in medusa.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "medusa_lm_head.safetensors", "tree.json", "verification.json",
            "training_summary.json", "config.resolved.yaml", "plots/tree.png", "plots/acceptance_heatmap.png"} <= names  # fmt: skip
    assert json.loads((medusa / "config.json").read_text())["medusa_choices"] == [[0], [1], [0, 0]]
    verification = json.loads((medusa / "verification.json").read_text())
    assert verification["verdict"]["passed"] is True and "prompts" not in verification  # per-prompt data left out
    card = (medusa / "README.md").read_text()
    assert (
        "Lossless: passed" in card
        and "**2.25**" in card
        and "| 0 | t+2 | 0.700 | 0.100 |" in card
        and "[[0], [1], [0, 0]]" in card
    )
    assert "![plots/tree.png](plots/tree.png)" in card
    hidden = torch.randn(2, H)
    assert torch.equal(MedusaHeads.from_pretrained(out / "vllm")(hidden), heads(hidden))


def test_cli_exports_and_refuses_unverified_push(tmp_path, capsys):
    run_dir = tmp_path / "run"
    heads = _fake_run(run_dir)
    settings = json.loads((run_dir / "verify" / "report.json").read_text())["settings"]
    failed = {"settings": settings, "verdict": {"status": "fail", "passed": False}}
    (run_dir / "verify" / "report.json").write_text(json.dumps(failed))
    out = tmp_path / "out"
    rc = export_main(
        ["--heads", str(run_dir / "heads"), "--out", str(out), "--push-to-hub", "me/heads", "--no-tokenizer"]
    )
    assert rc == 2 and "--allow-unverified" in capsys.readouterr().err and not out.exists()
    rc = export_main(
        [
            "--heads",
            str(run_dir / "heads"),
            "--out",
            str(out),
            "--format",
            "all",
            "--no-tokenizer",
            "--dtype",
            "bfloat16",
        ]
    )
    assert rc == 0 and "FAILED" in (out / "medusa" / "README.md").read_text()
    hidden = torch.randn(2, H)
    loaded = MedusaHeads.from_pretrained(out / "medusa")
    assert loaded.heads[0][0].linear.weight.dtype == torch.float32
    assert torch.equal(loaded.heads[0][0].linear.weight, heads.heads[0][0].linear.weight.bfloat16().float())
    assert torch.allclose(loaded(hidden), heads(hidden), atol=0.1)
