"""The verifier's results: dataclasses, the report.json schema, the JUnit XML writer and the terminal summary table.

report.json (schema_version 2) is `VerifyReport.to_dict()`:

    schema_version   int, 2 (2 added the content hashes in settings)
    tool             "medusa-verify"
    toolkit_version  str
    created          str, ISO 8601 UTC time
    verdict          {status: "pass" | "fail" | "low_acceptance", passed: bool, exit_code: 0 | 1 | 3, reasons: [str]}
    settings         {base, base_identity, heads, heads_sha256, tree: {name, paths, num_nodes, depth, top_k},
                      tree_sha256, dtype, attn_implementation, reference_attn_implementation, device, max_new_tokens,
                      num_prompts, available_prompts, prompts_source, batch_size, strict, tie_tolerance,
                      min_accept_length}

`heads_sha256` (MedusaHeads.content_digest of the heads as loaded, before any dtype cast) and `tree_sha256` (paths and
top-k) name exactly what was verified: medusa-export's push gate and model card accept the report only for heads and a
tree with the same hashes. `num_prompts` of `available_prompts` were checked.
    summary          {prompts, passed, ties, mismatches, errors, reference_tokens, medusa_tokens, steps,
                      mean_accept_length, accept_length_histogram: {"<accept length>": count},
                      head_accuracy: [{head, offset, top1, top5, count}],
                      reference_tokens_per_s, medusa_tokens_per_s, speedup}
    notes            [str]
    prompts          [{index, prompt, status: "pass" | "tie" | "mismatch" | "error", prompt_tokens, reference_tokens,
                       medusa_tokens, steps, mean_accept_length, accept_lengths: [int], reference_time_s,
                       medusa_time_s, divergence: null | {position, kind: "tie" | "mismatch",
                       reference_token: {id, text}, candidate_token: {id: int | null, text: str | null},
                       margin, gap, tolerance, context}, error: null | str}]

`position` counts generated tokens from 0. `margin` is the reference's top-1 minus top-2 logit there; `gap` the
reference logit of its own token minus that of the candidate's (the divergence is a TIE when gap <= tolerance).
Speeds are wall-clock information, never a gate. `REPORT_SCHEMA` below is the same schema as data; `validate_report`
checks a dict against it (a JSON-Schema subset: type, required, properties, items, enum, values).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2

# ----------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Divergence:
    """The first position where the Medusa output differs from the reference, and how it was classified."""

    position: int  # index among the generated tokens
    kind: str  # "tie" | "mismatch"
    reference_token: dict  # {"id": int, "text": str}
    candidate_token: dict  # {"id": int | None, "text": str | None}; None when the candidate stopped early
    margin: float  # reference top-1 minus top-2 logit at `position`
    gap: float  # reference logit of its token minus that of the candidate's token (inf when none)
    tolerance: float
    context: str  # reference text just before the divergence


@dataclass
class PromptResult:
    index: int
    prompt: str
    status: str  # "pass" | "tie" | "mismatch" | "error"
    prompt_tokens: int
    reference_tokens: int = 0
    medusa_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    reference_time_s: float = 0.0
    medusa_time_s: float = 0.0
    divergence: Divergence | None = None
    error: str | None = None

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"], d["mean_accept_length"] = self.steps, self.mean_accept_length
        return d


@dataclass
class VerifyReport:
    settings: dict
    prompts: list[PromptResult]
    summary: dict
    verdict: dict
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def exit_code(self) -> int:
        return self.verdict["exit_code"]

    @property
    def passed(self) -> bool:
        return self.verdict["passed"]

    def to_dict(self) -> dict:
        from medusa_toolkit.version import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "medusa-verify",
            "toolkit_version": __version__,
            "created": self.created,
            "verdict": self.verdict,
            "settings": self.settings,
            "summary": _finite(self.summary),
            "notes": self.notes,
            "prompts": [_finite(p.to_dict()) for p in self.prompts],
        }


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# Schema

_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_TOKEN = {
    "type": "object",
    "required": ["id", "text"],
    "properties": {"id": {"type": ["integer", "null"]}, "text": {"type": ["string", "null"]}},
}
REPORT_SCHEMA: dict = {
    "type": "object",
    "required": ["schema_version", "tool", "toolkit_version", "created", "verdict", "settings", "summary", "notes", "prompts"],
    "properties": {
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "tool": {"enum": ["medusa-verify"]},
        "toolkit_version": _STR,
        "created": _STR,
        "verdict": {
            "type": "object",
            "required": ["status", "passed", "exit_code", "reasons"],
            "properties": {
                "status": {"enum": ["pass", "fail", "low_acceptance"]},
                "passed": {"type": "boolean"},
                "exit_code": {"enum": [0, 1, 3]},
                "reasons": {"type": "array", "items": _STR},
            },
        },
        "settings": {
            "type": "object",
            "required": ["base", "heads", "heads_sha256", "tree", "tree_sha256", "dtype", "attn_implementation",
                         "max_new_tokens", "num_prompts", "available_prompts", "batch_size", "strict", "tie_tolerance",
                         "min_accept_length"],
            "properties": {
                "heads_sha256": _STR,
                "tree_sha256": _STR,
                "available_prompts": _INT,
                "tree": {"type": "object", "required": ["name", "paths", "num_nodes", "depth", "top_k"]},
                "dtype": {"enum": ["float32", "bfloat16", "float16"]},
                "max_new_tokens": _INT,
                "num_prompts": _INT,
                "batch_size": _INT,
                "strict": {"type": "boolean"},
                "tie_tolerance": {"type": "number"},
                "min_accept_length": _NUM,
            },
        },
        "summary": {
            "type": "object",
            "required": ["prompts", "passed", "ties", "mismatches", "errors", "reference_tokens", "medusa_tokens",
                         "steps", "mean_accept_length", "accept_length_histogram", "head_accuracy",
                         "reference_tokens_per_s", "medusa_tokens_per_s", "speedup"],
            "properties": {
                **{k: _INT for k in ("prompts", "passed", "ties", "mismatches", "errors", "reference_tokens",
                                     "medusa_tokens", "steps")},
                "mean_accept_length": _NUM,
                "accept_length_histogram": {"type": "object", "values": _INT},
                "head_accuracy": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["head", "offset", "top1", "top5", "count"],
                        "properties": {"head": _INT, "offset": _INT, "top1": _NUM, "top5": _NUM, "count": _INT},
                    },
                },
                "reference_tokens_per_s": _NUM,
                "medusa_tokens_per_s": _NUM,
                "speedup": _NUM,
            },
        },
        "notes": {"type": "array", "items": _STR},
        "prompts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "prompt", "status", "prompt_tokens", "reference_tokens", "medusa_tokens", "steps",
                             "mean_accept_length", "accept_lengths", "reference_time_s", "medusa_time_s",
                             "divergence", "error"],
                "properties": {
                    "index": _INT,
                    "prompt": _STR,
                    "status": {"enum": ["pass", "tie", "mismatch", "error"]},
                    "accept_lengths": {"type": "array", "items": _INT},
                    "error": {"type": ["string", "null"]},
                    "divergence": {
                        "type": ["object", "null"],
                        "required": ["position", "kind", "reference_token", "candidate_token", "margin", "gap",
                                     "tolerance", "context"],
                        "properties": {
                            "position": _INT,
                            "kind": {"enum": ["tie", "mismatch"]},
                            "reference_token": _TOKEN,
                            "candidate_token": _TOKEN,
                            "margin": _NUM,
                            "gap": _NUM,
                            "tolerance": {"type": "number"},
                            "context": _STR,
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}  # fmt: skip


def validate_report(data: Any, schema: dict = REPORT_SCHEMA, path: str = "$") -> list[str]:
    """Problems with `data` against the schema (empty when it conforms)."""
    errors: list[str] = []
    if "enum" in schema and data not in schema["enum"]:
        errors.append(f"{path}: {data!r} not in {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(data, _TYPES[t]) and not (t in ("integer", "number") and isinstance(data, bool)) for t in types
        )
        if not ok:
            return errors + [f"{path}: expected {' or '.join(types)}, got {type(data).__name__}"]
    if isinstance(data, dict):
        errors += [f"{path}: missing key '{k}'" for k in schema.get("required", []) if k not in data]
        for key, sub in schema.get("properties", {}).items():
            if key in data:
                errors += validate_report(data[key], sub, f"{path}.{key}")
        if "values" in schema:
            for key, value in data.items():
                errors += validate_report(value, schema["values"], f"{path}.{key}")
    if isinstance(data, list) and "items" in schema:
        for i, item in enumerate(data):
            errors += validate_report(item, schema["items"], f"{path}[{i}]")
    return errors


# ----------------------------------------------------------------------------------------------------------------------
# Writers


def write_json(report: VerifyReport, path: str | Path) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def _divergence_text(p: PromptResult) -> str:
    d = p.divergence
    if d is None:
        return ""
    cand = d.candidate_token
    return (
        f"{d.kind.upper()} at generated token {d.position}: reference {d.reference_token['id']} "
        f"{d.reference_token['text']!r}, medusa {cand['id']} {cand['text']!r}; reference top-2 margin {d.margin:.3g}, "
        f"gap {d.gap:.3g}, tolerance {d.tolerance:.3g}\ncontext: ...{d.context!r}"
    )


def junit_xml(report: VerifyReport, strict: bool | None = None) -> ET.ElementTree:
    """JUnit XML: one testcase per prompt (MISMATCH/error -> failure; TIE -> pass with a note, failure under strict)."""
    strict = report.settings.get("strict", False) if strict is None else strict
    tree_name = (report.settings.get("tree") or {}).get("name") or "tree"
    suite = ET.Element("testsuite", name="medusa-verify", timestamp=report.created)
    props = ET.SubElement(suite, "properties")
    for key in ("base", "heads", "dtype", "attn_implementation", "max_new_tokens"):
        ET.SubElement(props, "property", name=key, value=str(report.settings.get(key)))
    ET.SubElement(props, "property", name="mean_accept_length", value=f"{report.summary['mean_accept_length']:.3f}")
    failures = errors = 0
    total_time = 0.0
    for p in report.prompts:
        seconds = p.reference_time_s + p.medusa_time_s
        total_time += seconds
        short = " ".join(p.prompt.split())[:60]
        case = ET.SubElement(
            suite, "testcase", classname=f"medusa-verify.{tree_name}", name=f"prompt-{p.index:03d}: {short}",
            time=f"{seconds:.3f}",
        )  # fmt: skip
        if p.status == "error":
            errors += 1
            ET.SubElement(case, "error", message=p.error or "error", type="ERROR").text = p.error
        elif p.status == "mismatch" or (p.status == "tie" and strict):
            failures += 1
            kind = "MISMATCH" if p.status == "mismatch" else "TIE"
            pos = p.divergence.position if p.divergence else "?"
            ET.SubElement(
                case, "failure", message=f"{kind} at generated token {pos}", type=kind
            ).text = _divergence_text(p)
        elif p.status == "tie":
            ET.SubElement(case, "system-out").text = "numerical tie (allowed): " + _divergence_text(p)
        else:
            ET.SubElement(
                case, "system-out"
            ).text = f"{p.reference_tokens} tokens identical; mean accept length {p.mean_accept_length:.2f}"
    min_accept = report.settings.get("min_accept_length")
    tests = len(report.prompts)
    if min_accept is not None:  # the acceptance gate as its own test case
        tests += 1
        mean = report.summary["mean_accept_length"]
        case = ET.SubElement(
            suite, "testcase", classname="medusa-verify.acceptance", name="mean-accept-length", time="0"
        )
        if not mean >= min_accept:  # nan (no steps at all) fails too
            failures += 1
            msg = f"mean accept length {mean:.3f} < required {min_accept}"
            ET.SubElement(case, "failure", message=msg, type="LOW_ACCEPTANCE").text = msg
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    suite.set("time", f"{total_time:.3f}")
    root = ET.Element("testsuites", name="medusa-verify", tests=str(tests), failures=str(failures), errors=str(errors))
    root.append(suite)
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report: VerifyReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_xml(report).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def summary_table(report: VerifyReport, max_rows: int = 50) -> str:
    """A readable plain-text summary: one row per prompt, then acceptance, head accuracy, speed and the verdict."""
    s, st = report.summary, report.settings
    lines = [
        f"medusa-verify  base={st.get('base')}  heads={st.get('heads')}  tree={st['tree'].get('name')} "
        f"({st['tree'].get('num_nodes')} nodes)  dtype={st.get('dtype')}  attn={st.get('attn_implementation')}",
        f"checked {s['prompts']} of {st.get('available_prompts', s['prompts'])} prompts from "
        f"{st.get('prompts_source') or 'the given list'}; heads sha256 {str(st.get('heads_sha256'))[:16]}..., "
        f"tree sha256 {str(st.get('tree_sha256'))[:16]}...",
        f"reference: {st.get('reference') or 'transformers generate()'}",
        "",
        f"{'#':>4}  {'status':<8} {'tokens':>6} {'steps':>5} {'accept':>6}  first divergence",
    ]
    for p in report.prompts[:max_rows]:
        d = p.divergence
        where = ""
        if d is not None:
            where = f"@{d.position}: ref {d.reference_token['text']!r} vs medusa {d.candidate_token['text']!r} (gap {d.gap:.3g})"
        elif p.error:
            where = p.error.splitlines()[0][:70]
        lines.append(
            f"{p.index:>4}  {p.status.upper():<8} {p.reference_tokens:>6} {p.steps:>5} {p.mean_accept_length:>6.2f}  {where}"
        )
    if len(report.prompts) > max_rows:
        lines.append(f"  ... {len(report.prompts) - max_rows} more prompts in report.json")
    hist = "  ".join(f"{k}:{v}" for k, v in s["accept_length_histogram"].items())
    lines += [
        "",
        f"prompts {s['prompts']}  passed {s['passed']}  ties {s['ties']}  mismatches {s['mismatches']}  errors {s['errors']}",
        f"mean accepted tokens/step {_fmt(s['mean_accept_length'])}   histogram (length:steps) {hist}",
        "head accuracy vs reference   " + "  ".join(
            f"h{h['head']}(+{h['offset']}) top1 {_fmt(h['top1'], '.1%')} top5 {_fmt(h['top5'], '.1%')}" for h in s["head_accuracy"]
        ),
        f"tokens/s  reference {_fmt(s['reference_tokens_per_s'], '.1f')}  medusa {_fmt(s['medusa_tokens_per_s'], '.1f')}  "
        f"speedup {_fmt(s['speedup'])}x (information only)",
    ]  # fmt: skip
    lines += [f"note: {n}" for n in report.notes]
    v = report.verdict
    lines.append(
        f"verdict: {v['status'].upper()} (exit {v['exit_code']})" + "".join(f"\n  - {r}" for r in v["reasons"])
    )
    return "\n".join(lines)
