"""The README.md model card of an exported package, built with huggingface_hub's ModelCard / ModelCardData.

Reads only plain dicts (heads config, tree.json, the verify report, training summary), so a missing artefact just
drops its section. The serving commands are the ones each engine documents for Medusa heads:
TGI reads `medusa_num_heads` + `base_model_name_or_path` from config.json; vLLM takes the vllm package through
`--speculative-config`; TensorRT-LLM converts the medusa package with examples/medusa/convert_checkpoint.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from medusa_toolkit.version import __version__

# Keys we look for in the verify report / tree.json / training summary (first hit wins).
_ACCEPTANCE_KEYS = ("per_head_acceptance", "head_acceptance", "acceptance_rates", "acceptance", "top1_acceptance")
_ACCEPT_LENGTH_KEYS = ("mean_accept_length", "mean_accepted_tokens", "avg_accept_length", "expected_accept_length")


def verification_verdict(report: dict | None) -> bool | None:
    """True (lossless), False (failed) or None (no report / no verdict in it)."""
    if not report:
        return None
    verdict = report.get("verdict")
    if isinstance(verdict, dict):  # medusa-verify's report.json: {"verdict": {"status", "passed", ...}}
        report = verdict
    for key in ("passed", "lossless", "ok"):
        if isinstance(report.get(key), bool):
            return report[key]
    verdict = str(report.get("verdict", report.get("status", ""))).lower()
    if verdict in ("pass", "passed", "lossless", "ok", "success"):
        return True
    if verdict in ("fail", "failed", "error", "lossy"):
        return False
    return None


def report_mismatch(report: dict | None, heads_sha256: str | None, tree_sha256: str | None) -> str | None:
    """None when a verify report names exactly these heads (and this tree, when one is shipped); else why not.

    A report is about the bytes it hashed: a passing report for other heads, or for retrained heads, vouches for
    nothing here.
    """
    settings = (report or {}).get("settings")
    if not isinstance(settings, dict) or not settings.get("heads_sha256"):
        return "the report does not name the heads it verified (no settings.heads_sha256; verify them again)"
    if heads_sha256 is not None and settings["heads_sha256"] != heads_sha256:
        return f"it verified heads {settings['heads_sha256'][:12]}, these heads are {heads_sha256[:12]}"
    verified_tree = settings.get("tree_sha256")
    if tree_sha256 is not None and verified_tree != tree_sha256:
        return f"it verified tree {str(verified_tree)[:12]}, the shipped tree.json is {tree_sha256[:12]}"
    return None


def _find(sources: Sequence[dict | None], keys: Sequence[str]) -> Any:
    for source in sources:
        for scope in (source, (source or {}).get("summary")):  # medusa-verify keeps its numbers under "summary"
            for key in keys:
                if isinstance(scope, dict) and scope.get(key) is not None:
                    return scope[key]
    return None


def acceptance_matrix(sources: Sequence[dict | None]) -> tuple[list[str], list[list[float]]] | None:
    """(column labels, rows: one per head) of measured acceptance, from tree.json (tuning's head x rank accuracy),
    the verify report (per-head top-1/top-5) or a generic per-head list."""
    for source in sources:
        acc = (source or {}).get("acceptance")
        if isinstance(acc, dict) and isinstance(acc.get("head_rank_accuracy"), list) and acc["head_rank_accuracy"]:
            rows = [[float(x) for x in row] for row in acc["head_rank_accuracy"]]
            return [f"rank {r + 1}" for r in range(max(len(r) for r in rows))], rows
        per_head = ((source or {}).get("summary") or {}).get("head_accuracy")
        if isinstance(per_head, list) and per_head and all(isinstance(h, dict) for h in per_head):
            cols = [k for k in ("top1", "top5") if k in per_head[0]]
            return [c.replace("top", "top-") for c in cols], [[float(h[c]) for c in cols] for h in per_head]
    acc = _find(sources, _ACCEPTANCE_KEYS)
    if isinstance(acc, dict):  # {"head_0": 0.8, ...}
        acc = list(acc.values())
    if not isinstance(acc, list) or not acc:
        return None
    try:
        if all(isinstance(a, (list, tuple)) for a in acc):
            return [f"top-{r + 1}" for r in range(max(len(a) for a in acc))], [[float(x) for x in a] for a in acc]
        return ["acceptance"], [[float(a)] for a in acc]
    except (TypeError, ValueError):
        return None


@dataclass
class CardInfo:
    """Everything the card shows. `fmt` is the package's layout: 'medusa' or 'vllm'."""

    fmt: str
    heads_config: dict
    base_model: str | None
    base_model_hub_id: str | None = None  # only a real Hub id goes into the `base_model` metadata
    license: str | None = None
    repo_id: str | None = None  # where this package is (to be) pushed
    medusa_repo_id: str | None = None
    vllm_repo_id: str | None = None
    tree: dict | None = None
    verification: dict | None = None
    training_summary: dict | None = None
    plots: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dtype: str | None = None
    heads_sha256: str | None = None  # the packaged heads (before any dtype cast)
    tree_sha256: str | None = None


def _acceptance_section(info: CardInfo) -> str:
    # A report about other heads says nothing about these: its numbers stay off the card.
    report = (
        info.verification if report_mismatch(info.verification, info.heads_sha256, info.tree_sha256) is None else None
    )
    found = acceptance_matrix((info.tree, report, info.training_summary))
    length = _find((report, info.tree, info.training_summary), _ACCEPT_LENGTH_KEYS)
    lines = []
    if found is not None:
        cols, rows = found
        lines += ["| head | predicts | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        lines += [f"| {i} | t+{i + 2} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for i, row in enumerate(rows)]
    if isinstance(length, (int, float)):
        lines.append(f"\nMean accepted tokens per decoding step: **{float(length):.2f}**")
    if not lines:
        return ""
    return "## Measured acceptance\n\n" + "\n".join(lines) + "\n"


def _verification_section(info: CardInfo) -> str:
    verdict = verification_verdict(info.verification)
    mismatch = report_mismatch(info.verification, info.heads_sha256, info.tree_sha256) if info.verification else None
    if verdict is None:
        text = "**Not verified.** No passing verification report came with these heads."
    elif mismatch is not None:
        text = f"**Not verified.** The verification report that came with this export is not about these heads: {mismatch}."
    elif verdict:
        text = (
            "**Lossless: passed.** Medusa decoding produced exactly the base model's greedy tokens on every prompt "
            f"(heads sha256 `{info.heads_sha256}`"
            + (f", tree sha256 `{info.tree_sha256}`" if info.tree_sha256 else "")
            + (f"; weights cast to {info.dtype} for this package after verification" if info.dtype else "")
            + ")."
        )
    else:
        text = "**FAILED.** Medusa decoding diverged from the base model's greedy output; do not serve these heads."
    report = info.verification or {}
    details = {}
    for scope in (report, report.get("verdict"), report.get("summary")):
        if isinstance(scope, dict):
            details.update({k: v for k, v in scope.items() if isinstance(v, (int, float, str, bool))})
    if details and mismatch is None:
        text += "\n\n| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in details.items())
    return "## Verification\n\n" + text + "\n"


def _usage_sections(info: CardInfo) -> str:
    c = info.heads_config
    n, layers = c["medusa_num_heads"], c["medusa_num_layers"]
    base = info.base_model or "<base model>"
    engine_base = info.base_model_hub_id or base  # engines need a Hub id (or a local HF folder), not our aliases
    medusa_ref = info.medusa_repo_id or ("<this repo>" if info.fmt == "medusa" else "<medusa package folder>")
    vllm_ref = info.vllm_repo_id or ("<this repo>" if info.fmt == "vllm" else "<vllm package folder>")
    tree_arg = ', tree=MedusaTree.from_file("tree.json")' if info.tree else ""
    tree_import = ", MedusaTree" if info.tree else ""
    choices = json.dumps(info.tree["paths"] if info.tree else [[0] * d for d in range(1, n + 1)])  # default: a chain
    spec = json.dumps({"method": "medusa", "model": vllm_ref, "num_speculative_tokens": n})
    return f"""## Use with medusa-toolkit

```python
from medusa_toolkit import MedusaModel, medusa_generate{tree_import}

model = MedusaModel.from_pretrained(base="{base}", heads="{info.repo_id or "<this folder>"}")
ids = model.tokenizer("Hello", return_tensors="pt").input_ids
out = medusa_generate(model, ids, max_new_tokens=128{tree_arg})
print(model.tokenizer.decode(out.sequences[0]), out.mean_accept_length)
```

`MedusaModel.from_pretrained(heads=...)` reads both the medusa and the vllm layout.

## Use with Text Generation Inference (TGI)

TGI reads `base_model_name_or_path` and `medusa_num_heads` from the medusa package's config.json and loads the
base itself; `--speculate` (at most {n}) limits how many heads it uses:

```bash
docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/data:/data \\
    ghcr.io/huggingface/text-generation-inference:latest \\
    --model-id {medusa_ref} --speculate {n}
```

## Use with vLLM

vLLM loads the **vllm** package (config `model_type: medusa`) as the draft model; it proposes the top-1 token of each
head (no tree):

```bash
vllm serve {engine_base} --speculative-config '{spec}'
```

```python
from vllm import LLM
llm = LLM(model="{engine_base}", speculative_config={spec})
```

## Use with TensorRT-LLM

Convert the base plus the **medusa** package with TensorRT-LLM's `examples/medusa/convert_checkpoint.py`, build, and run
with the tuned tree as `--medusa_choices`:

```bash
hf download {engine_base} --local-dir ./base-model
hf download {medusa_ref} --local-dir ./medusa-heads
cd TensorRT-LLM/examples/medusa
python convert_checkpoint.py --model_dir ./base-model --medusa_model_dir ./medusa-heads \\
    --output_dir ./tllm_checkpoint_medusa --dtype float16 --num_medusa_heads {n} --num_medusa_layers {layers}
trtllm-build --checkpoint_dir ./tllm_checkpoint_medusa --output_dir ./trt_engine_medusa \\
    --gemm_plugin float16 --speculative_decoding_mode medusa --max_batch_size 4
python ../run.py --engine_dir ./trt_engine_medusa --tokenizer_dir ./base-model --use_py_session \\
    --temperature 0.0 --max_output_len 100 --input_text "Hello" \\
    --medusa_choices="{choices}"
```
"""


def build_model_card(info: CardInfo) -> ModelCard:
    """The package's model card: Hub metadata + what the heads are, how to serve them, acceptance and verification."""
    c = info.heads_config
    shared = c.get("head_type") == "shared_lm_head"
    data = ModelCardData(
        base_model=info.base_model_hub_id,
        library_name="medusa-toolkit",
        license=info.license,
        tags=["medusa", "speculative-decoding"] + (["vllm"] if info.fmt == "vllm" else []),
        pipeline_tag="text-generation",
    )
    layout = (
        "Medusa layout (`medusa_lm_head.safetensors` + `config.json`), read by TGI and TensorRT-LLM's converter"
        if info.fmt == "medusa"
        else "vLLM's Medusa draft-model layout (`model.safetensors`, config `model_type: medusa`)"
    )
    lines = [
        f"# Medusa heads for {info.base_model or 'a causal LM'}",
        "",
        f"{c['medusa_num_heads']} Medusa heads ({c['medusa_num_layers']} residual layer(s) each, hidden size "
        f"{c['hidden_size']}, vocabulary {c['vocab_size']}) trained with medusa-toolkit {__version__} on the frozen "
        f"base model `{info.base_model}`. Head k guesses the token k+2 positions ahead; the base model verifies every "
        f"guess, so greedy output is unchanged. This package uses the {layout}"
        + (f", weights in {info.dtype}." if info.dtype else "."),
    ]
    if shared:
        lines += [
            "",
            "> **Shared projection.** These heads were trained to reuse the base model's lm_head. Engines expect a "
            "projection per head, so "
            + (
                "each head's `{i}." + str(c["medusa_num_layers"]) + ".weight` is a copy of the base lm_head."
                if info.fmt == "medusa"
                else "config.json sets `original_lm_head: true` and `lm_heads.0.weight` is the base lm_head."
            ),
        ]
    if c.get("truncated_vocab_size"):
        lines += [
            "",
            f"> **Truncated vocabulary.** The heads were trained to guess among the {c['truncated_vocab_size']} tokens "
            "listed in the `token_map` tensor (those the base emitted most often in the training data). "
            + (
                "vLLM reads it (`truncated_vocab_size`) and drafts only those tokens."
                if info.fmt != "medusa"
                else "TGI and TensorRT-LLM do not know token maps, so the projections here cover the whole vocabulary: "
                "the trained rows at the map's tokens and the base lm_head's rows elsewhere."
            ),
        ]
    sections = ["\n".join(lines) + "\n", _verification_section(info), _acceptance_section(info)]
    if info.tree:
        paths = info.tree.get("paths", [])
        depth = max((len(p) for p in paths), default=0)
        sections.append(
            f"## Tuned tree\n\n{len(paths)} candidate paths (+ root), depth {depth}, top-{info.tree.get('top_k')}"
            f" (`tree.json`, upstream `medusa_choices` format):\n\n```json\n{json.dumps(paths)}\n```\n"
        )
    sections.append(_usage_sections(info))
    if info.plots:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{p}]({p})" for p in info.plots) + "\n")
    if info.files:
        sections.append("## Files\n\n" + "\n".join(f"- `{f}`" for f in info.files) + "\n")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(s for s in sections if s)
    return ModelCard(content)
