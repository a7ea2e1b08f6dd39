"""Push to a local Hub-compatible server with the real huggingface_hub client: one commit per package, LFS for the
weights, byte-identical download; 503s are retried; 401 and unverified heads give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download

from medusa_toolkit import MedusaHeads
from medusa_toolkit.export.cli import main as export_main
from medusa_toolkit.export.package import ExportInputs, export_packages
from medusa_toolkit.export.stage import push_packages
from medusa_toolkit.hub import HubPushError, push_folder

TOKEN = "hf_test_token"


@pytest.fixture
def packages(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(64, 256, 3, 1, base_model_name_or_path="org/base")
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    inputs = ExportInputs(heads, license="apache-2.0", base_model_hub_id="org/base", verification={"passed": True})
    return heads, export_packages(inputs, tmp_path / "export", "all", repo_id="me/heads")


def _local_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_then_download_byte_identical(hub_env, packages, tmp_path):
    heads, folders = packages
    hub = hub_env(token=TOKEN)
    results = push_packages(folders, "me/heads", private=True, log=lambda *a: None)
    assert [r.repo_id for r in results] == ["me/heads", "me/heads-vllm"]
    # One commit per repo, weights through LFS (preupload said lfs, batch gave an upload URL, the PUT stored them).
    assert [c["repo"] for c in hub.state.commits] == ["me/heads", "me/heads-vllm"]
    assert sum(route == "lfs_upload" for route, _, status in hub.state.calls if status == 200) == 2
    assert hub.state.repos["me/heads"]["private"]
    api = HfApi(endpoint=hub.endpoint)
    for fmt, repo in (("medusa", "me/heads"), ("vllm", "me/heads-vllm")):
        local = _local_files(folders[fmt])
        assert sorted(api.list_repo_files(repo)) == sorted(local)
        for name, content in local.items():
            path = hf_hub_download(repo, name, endpoint=hub.endpoint, cache_dir=tmp_path / "dl")
            assert open(path, "rb").read() == content, name
        snapshot = Path(hf_hub_download(repo, "config.json", endpoint=hub.endpoint, cache_dir=tmp_path / "dl")).parent
        downloaded = MedusaHeads.from_pretrained(snapshot)
        hidden = torch.randn(2, 64)
        assert torch.equal(downloaded(hidden), heads(hidden))
    card = (folders["medusa"] / "README.md").read_text()
    assert '"model": "me/heads-vllm"' in card and "--model-id me/heads" in card


def test_503s_are_retried(hub_env, packages):
    _, folders = packages
    hub = hub_env(token=TOKEN, fail_first={"create": 2, "commit": 1})
    logs = []
    result = push_folder(folders["medusa"], "me/retry", backoff=0.01, log=logs.append)
    statuses = [(route, status) for route, _, status in hub.state.calls if route in ("create", "commit")]
    assert statuses == [("create", 503), ("create", 503), ("create", 200), ("commit", 503), ("commit", 200)]
    assert len(hub.state.commits) == 1 and result.commit_oid == hub.state.repos["me/retry"]["branches"]["main"]["sha"]
    assert sum("failed (HfHubHTTPError" in line and "503" in line for line in logs) == 3
    assert set(hub.state.files("me/retry")) == set(_local_files(folders["medusa"]))


def test_401_gives_clear_error_without_retrying(hub_env, packages):
    _, folders = packages
    hub = hub_env(token="the-right-token")
    with pytest.raises(HubPushError, match=r"401.*HF_TOKEN"):
        push_folder(folders["medusa"], "me/denied", backoff=0.01, log=lambda *a: None)
    assert [route for route, _, _ in hub.state.calls].count("create") == 1 and not hub.state.commits


def test_cli_push_to_branch_and_pr_and_unverified_refusal(hub_env, tmp_path, capsys):
    hub = hub_env(token=TOKEN)
    heads = MedusaHeads(64, 256, 2, 1, base_model_name_or_path="org/base")
    heads.save_pretrained(tmp_path / "heads")
    args = ["--heads", str(tmp_path / "heads"), "--out", str(tmp_path / "out"), "--no-tokenizer"]
    assert export_main([*args, "--push-to-hub", "me/cli"]) == 2
    assert "refusing to push" in capsys.readouterr().err and not hub.state.calls
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"passed": True, "settings": {"heads_sha256": heads.content_digest()}}))
    rc = export_main(
        [*args, "--push-to-hub", "me/cli", "--verification", str(report), "--revision", "dev", "--commit-message", "v1"]
    )
    assert rc == 0 and hub.state.commits[-1]["rev"] == "dev" and hub.state.commits[-1]["summary"] == "v1"
    assert "verification.json" in hub.state.files("me/cli", "dev")
    rc = export_main([*args, "--push-to-hub", "me/cli", "--allow-unverified", "--create-pr"])
    assert rc == 0 and hub.state.commits[-1]["rev"] == "refs/pr/1"
    assert "discussions/1" in capsys.readouterr().out


def test_heads_push_to_hub_goes_through_exports_package_and_gate(hub_env, tmp_path):
    """`MedusaHeads.push_to_hub` is medusa-export's medusa package behind its gate: refused without a passing report
    about these heads, pushed with the model card (and "Not verified") when explicitly allowed, with the report's
    verdict when one names these heads."""
    from medusa_toolkit.export.package import ExportError

    torch.manual_seed(0)
    heads = MedusaHeads(64, 256, 2, 1, base_model_name_or_path="org/base")
    hub = hub_env(token=TOKEN)
    with pytest.raises(ExportError, match="refusing to push"):
        heads.push_to_hub("me/bare")
    assert not hub.state.commits  # nothing left the machine
    heads.push_to_hub("me/unverified", allow_unverified=True, log=lambda *a: None)
    files = hub.state.files("me/unverified")
    assert {"README.md", "config.json", "medusa_lm_head.safetensors"} <= set(files)
    assert "Not verified" in files["README.md"].decode()
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"verdict": {"passed": True}, "settings": {"heads_sha256": heads.content_digest()}}))
    heads.push_to_hub("me/verified", verification=report, log=lambda *a: None)
    card = hub.state.files("me/verified")["README.md"].decode()
    assert "Not verified" not in card and "verification.json" in hub.state.files("me/verified")
