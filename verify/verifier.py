"""The losslessness verifier: Medusa greedy decoding must be token-identical to the base model's greedy generate.

For every prompt the *reference* is the base's plain `generate(do_sample=False)` under SDPA (raw logits kept for the
tie check) and the *candidate* is `medusa_toolkit.decoding.generate.medusa_generate` with the tree and attention under test.
At the first differing token the divergence is a numerical TIE when the candidate's token is within `tolerance` of the
reference's best logit (so the reference's top-2 margin is too), else a MISMATCH: a real bug (mask, positions, cache).
Alongside, it measures what users tune for: accepted tokens per step, per-head accuracy, tokens/s of both sides.

`verify_heads` is the one function behind both `medusa-verify` (verify/cli.py) and the pipeline's `verify` stage
(`run_verify`). Report format and writers: verify/report.py.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medusa_toolkit import distributed as D
from medusa_toolkit import special_tokens
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.run_dir import JUNIT_FILE, REPORT_FILE, RunDir
from medusa_toolkit.verify.report import Divergence, PromptResult, VerifyReport, summary_table, write_json, write_junit

# Default tie tolerances (logit units) per dtype. float32 paths differ only by reduction order (~1e-5 on logits);
# half precision rounds logits of magnitude ~10-30 to steps of 0.06 (bf16) / 0.01 (fp16) and the verify forward
# accumulates differently from the SDPA prefill, so near-ties flip legitimately. Heuristics: override per run.
TIE_TOLERANCE = {"float32": 1e-4, "float16": 0.1, "bfloat16": 0.5}
CONTEXT_TOKENS = 24
HEAD_TOP_K = 5


def default_tie_tolerance(dtype: str | torch.dtype) -> float:
    name = str(dtype).removeprefix("torch.")
    return TIE_TOLERANCE.get(name, TIE_TOLERANCE["float32"])


def classify_divergence(
    reference_logits: torch.Tensor, reference_token: int, candidate_token: int | None, tolerance: float
) -> tuple[str, float, float]:
    """("tie" | "mismatch", margin, gap) for a divergence, from the reference's logits [V] at that position.

    margin = reference top-1 minus top-2 logit; gap = reference logit of its own token minus that of the candidate's
    token. TIE iff gap <= tolerance (which implies margin <= tolerance): the candidate picked a token the reference
    itself scored as equal within numerical noise. A candidate that stopped early (no token) is always a MISMATCH.
    """
    logits = reference_logits.float().flatten()
    top2 = logits.topk(min(2, logits.numel())).values
    margin = float(top2[0] - top2[-1]) if top2.numel() == 2 else math.inf
    if candidate_token is None:
        return "mismatch", margin, math.inf
    gap = float(logits[reference_token] - logits[candidate_token])
    return ("tie" if gap <= tolerance else "mismatch"), margin, gap


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """Index of the first differing generated token (a length difference counts), or None when identical."""
    for i, (r, c) in enumerate(zip(reference, candidate)):
        if r != c:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=False)


@torch.inference_mode()
def reference_generate(
    model: Any, input_ids: torch.Tensor, max_new_tokens: int
) -> tuple[list[int], torch.Tensor, float]:
    """The base's plain greedy decoding under SDPA: (new token ids, raw logits [n, V], seconds).

    A fresh GenerationConfig keeps only the special token ids, so no repetition penalty or other processor from the
    model's generation_config changes "greedy".
    """
    from transformers import GenerationConfig

    from medusa_toolkit.decoding.generate import use_attention

    base = model.base
    eos, pad = special_tokens.eos_ids(model), special_tokens.pad_token_id(model)
    gen = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
        bos_token_id=base.generation_config.bos_token_id, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with use_attention(model, "sdpa", plain=True):
        start = time.perf_counter()
        out = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen)
        seconds = time.perf_counter() - start
    new = out.sequences[0, input_ids.shape[1] :].tolist()
    logits = torch.stack([step[0] for step in out.logits]) if out.logits else torch.empty(0)
    return new, logits.float().cpu(), seconds


REFERENCES = ("same_path", "generate")
REFERENCE_NAMES = {
    "same_path": "base greedy, its own one-token loop on the same forward ({path}, {attn})",
    "generate": "transformers generate() (eager, sdpa): an independent implementation",
}


@torch.inference_mode()
def reference_same_path(
    model: Any, input_ids: torch.Tensor, max_new_tokens: int, attn: str
) -> tuple[list[int], None, float]:
    """The base's greedy decoding through the same forward as the Medusa side (compiled where it is compiled, the same
    attention), in its own one-token loop: none of Medusa's tree, acceptance or commit code runs here, so a fault
    there is caught, while the numerics match Medusa's exactly (no logits are kept: see `teacher_forced_logits`)."""
    from medusa_toolkit.decoding.generate import Greedy, prefill, use_attention

    eos = set(special_tokens.eos_ids(model))
    with use_attention(model, attn):
        start = time.perf_counter()
        state = prefill(model, input_ids, None, 0, Greedy())
        new = [int(state.roots[0])]
        cache = state.cache
        while len(new) < max_new_tokens and new[-1] not in eos:
            position = cache.lens[:, None]
            cache.begin_forward(1)
            logits, _ = model.step_fn(torch.tensor([[new[-1]]], device=model.device), position, cache)
            cache.set_lens(cache.lens + 1)
            new.append(int(logits[0, -1].argmax()))
        seconds = time.perf_counter() - start
    return new, None, seconds


@torch.inference_mode()
def teacher_forced_logits(model: Any, prompt_ids: list[int], tokens: list[int], position: int) -> torch.Tensor:
    """The base's logits [V] after prompt + tokens[:position] (one plain forward): what a divergence at `position`
    is classified on when the reference kept no logits."""
    ids = torch.tensor(prompt_ids + tokens[:position], device=model.device)[None]
    out = model(ids, position_ids=torch.arange(ids.shape[1], device=model.device)[None], logits_to_keep=1,
                with_medusa=False)  # fmt: skip
    return out.logits[0, -1].float().cpu()


@torch.inference_mode()
def head_hits(model: Any, prompt_ids: list[int], continuation: list[int], top_k: int = HEAD_TOP_K) -> torch.Tensor:
    """Per-head [top-1 hits, top-k hits, count] [num_heads, 3] against the reference continuation.

    One causal forward over prompt + continuation; head k at position t is scored on token t + k + 2, for every t from
    the last prompt token (where decoding first applies the heads) whose target lies in the continuation.
    """
    tokens = torch.tensor(prompt_ids + continuation, device=model.device)[None]
    hits = torch.zeros(model.num_heads, 3, dtype=torch.long)
    p, total = len(prompt_ids), tokens.shape[1]
    if total < p + 2:
        return hits
    out = model(tokens, position_ids=torch.arange(total, device=tokens.device)[None])
    for k in range(model.num_heads):
        shift = k + 2
        if total - shift <= p - 1:  # continuation too short for this head
            continue
        t = torch.arange(p - 1, total - shift, device=tokens.device)
        targets = tokens[0, t + shift]
        topk = out.medusa_logits[k, 0, t].topk(min(top_k, out.medusa_logits.shape[-1]), dim=-1).indices
        hits[k, 0] = int((topk[:, 0] == targets).sum())
        hits[k, 1] = int((topk == targets[:, None]).any(-1).sum())
        hits[k, 2] = t.numel()
    return hits


@dataclass
class Candidate:
    """Medusa's output for one prompt: new tokens, tokens per step, wall time (a batch's time is shared out)."""

    tokens: list[int]
    accept_lengths: list[int]
    wall_time: float


def medusa_candidates(
    model: Any, batch: list[list[int]], tree: Any, max_new_tokens: int, attn: str
) -> list[Candidate] | str:
    """Run the decoding under test on a batch of prompts (batched Medusa when more than one); an error string if it crashed."""
    from medusa_toolkit.decoding import generate  # module attribute at call time: tests swap in sabotaged decoders

    eos = special_tokens.eos_ids(model)
    try:
        if len(batch) == 1:
            ids = torch.tensor(batch[0], device=model.device)[None]
            out = generate.medusa_generate(
                model, ids, max_new_tokens, tree=tree, eos_token_id=eos, attn_implementation=attn
            )
            return [Candidate(out.sequences[0, ids.shape[1] :].tolist(), list(out.accept_lengths), out.wall_time)]
        width = max(len(p) for p in batch)
        pad = special_tokens.pad_token_id(model)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        out = generate.medusa_generate_batch(
            model, ids, mask, max_new_tokens, tree=tree, eos_token_id=eos, attn_implementation=attn
        )
        share = out.wall_time / len(batch)
        return [
            Candidate(row[len(p) :].tolist(), list(out.accept_lengths[b]), share)
            for b, (p, row) in enumerate(zip(batch, out.rows()))
        ]
    except Exception as e:  # a crash of the decoding under test is a failed verification, not a tool error
        return f"{type(e).__name__}: {e}"


def verify_prompt(
    model: Any, tokenizer: Any, index: int, prompt: str, prompt_ids: list[int], tree: Any, max_new_tokens: int,
    attn: str, tolerance: float, candidate: Candidate | str | None = None, reference: str = "same_path",
) -> tuple[PromptResult, torch.Tensor]:  # fmt: skip
    """Reference vs candidate for one prompt: the PromptResult and the per-head hit counts.

    `candidate`: Medusa's output when it was decoded in a batch (None: decode this prompt alone). `reference`:
    `same_path` (the base's own greedy loop on the Medusa side's forward) or `generate` (transformers' generate()).
    """
    input_ids = torch.tensor(prompt_ids, device=model.device)[None]
    if reference == "generate":
        ref, ref_logits, ref_time = reference_generate(model, input_ids, max_new_tokens)
    else:
        ref, ref_logits, ref_time = reference_same_path(model, input_ids, max_new_tokens, attn)
    result = PromptResult(index, prompt, "pass", len(prompt_ids), reference_tokens=len(ref), reference_time_s=ref_time)
    hits = head_hits(model, prompt_ids, ref)
    if candidate is None:
        candidate = medusa_candidates(model, [prompt_ids], tree, max_new_tokens, attn)
        candidate = candidate if isinstance(candidate, str) else candidate[0]
    if isinstance(candidate, str):
        result.status, result.error = "error", candidate
        return result, hits
    cand = candidate.tokens
    result.medusa_tokens, result.medusa_time_s, result.accept_lengths = (
        len(cand),
        candidate.wall_time,
        list(candidate.accept_lengths),
    )
    pos = first_divergence(ref, cand)
    if pos is None:
        return result, hits
    if pos >= len(ref):  # the reference stopped (EOS) and Medusa went on: no reference logits to compare there
        ref_token, cand_token = None, cand[pos]
        kind, margin, gap = "mismatch", math.nan, math.inf
    else:
        ref_token, cand_token = ref[pos], (cand[pos] if pos < len(cand) else None)
        at = ref_logits[pos] if ref_logits is not None else teacher_forced_logits(model, prompt_ids, ref, pos)
        kind, margin, gap = classify_divergence(at, ref_token, cand_token, tolerance)
    tok = {"id": ref_token, "text": None if ref_token is None else _text(tokenizer, [ref_token])}
    result.divergence = Divergence(
        position=pos, kind=kind, reference_token=tok,
        candidate_token={"id": cand_token, "text": None if cand_token is None else _text(tokenizer, [cand_token])},
        margin=margin, gap=gap, tolerance=tolerance, context=_text(tokenizer, ref[max(0, pos - CONTEXT_TOKENS) : pos]),
    )  # fmt: skip
    result.status = kind
    return result, hits


def summarize(results: list[PromptResult], hits: torch.Tensor) -> dict:
    """The report's `summary`: counts, pooled acceptance, its histogram, per-head accuracy and speeds."""
    steps = [a for r in results for a in r.accept_lengths]
    ref_tokens = sum(r.reference_tokens for r in results)
    med_tokens = sum(r.medusa_tokens for r in results)
    ref_time = sum(r.reference_time_s for r in results)
    med_time = sum(r.medusa_time_s for r in results if r.status != "error")
    ref_tps = ref_tokens / ref_time if ref_time > 0 else math.nan
    med_tps = med_tokens / med_time if med_time > 0 else math.nan
    status = Counter(r.status for r in results)
    return {
        "prompts": len(results),
        "passed": status["pass"],
        "ties": status["tie"],
        "mismatches": status["mismatch"],
        "errors": status["error"],
        "reference_tokens": ref_tokens,
        "medusa_tokens": med_tokens,
        "steps": len(steps),
        "mean_accept_length": sum(steps) / len(steps) if steps else math.nan,
        "accept_length_histogram": {str(k): v for k, v in sorted(Counter(steps).items())},
        "head_accuracy": [
            {
                "head": k,
                "offset": k + 2,
                "top1": float(h[0]) / float(h[2]) if h[2] else math.nan,
                "top5": float(h[1]) / float(h[2]) if h[2] else math.nan,
                "count": int(h[2]),
            }
            for k, h in enumerate(hits.tolist())
        ],
        "reference_tokens_per_s": ref_tps,
        "medusa_tokens_per_s": med_tps,
        "speedup": med_tps / ref_tps if ref_tps > 0 else math.nan,
    }


def decide(
    summary: dict, strict: bool = False, min_accept_length: float | None = None, nonfinite: list[str] = ()
) -> dict:
    """The verdict: exit 1 on any mismatch/error (or tie under strict) or heads holding nan/inf (decoding stays exact
    with such heads, but they must never ship), else 3 when acceptance is too low, else 0."""
    reasons = []
    if nonfinite:
        reasons.append(f"the heads hold nan or inf ({', '.join(nonfinite[:3])}): a diverged training run; retrain them")
    if summary["mismatches"]:
        reasons.append(f"{summary['mismatches']} prompt(s) diverge from the base model's greedy output (MISMATCH)")
    if summary["errors"]:
        reasons.append(f"Medusa decoding raised an error on {summary['errors']} prompt(s)")
    if strict and summary["ties"]:
        reasons.append(f"{summary['ties']} prompt(s) diverge at a numerical tie, and --strict allows none")
    if reasons:
        return {"status": "fail", "passed": False, "exit_code": 1, "reasons": reasons}
    mean = summary["mean_accept_length"]
    if min_accept_length is not None and not (mean >= min_accept_length):  # nan (no steps) fails too
        reason = f"mean accept length {mean:.3f} is below the required {min_accept_length}"
        return {"status": "low_acceptance", "passed": False, "exit_code": 3, "reasons": [reason]}
    return {"status": "pass", "passed": True, "exit_code": 0, "reasons": []}


def verify_heads(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    tree: Any = None,
    max_new_tokens: int = 64,
    attn_implementation: str = "sdpa",
    tie_tolerance: float | None = None,
    strict: bool = False,
    min_accept_length: float | None = None,
    batch_size: int = 1,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    settings: dict | None = None,
    progress: bool = True,
    reference: str = "same_path",
) -> VerifyReport:
    """Verify a MedusaModel on prompts (strings rendered with the tokenizer's chat template, or token id lists).

    `tree`: anything `MedusaTree.resolve` takes (None: a chain over all heads). `settings`: extra entries for the
    report (e.g. base/heads names). `reference`: what Medusa's tokens are compared with — `same_path` (the base's
    own greedy loop on the same forward: compiled where Medusa is, the same attention; like with like) or `generate`
    (transformers' generate() under its own SDPA: an independent implementation, where numerical ties can appear).
    Returns the VerifyReport; its `exit_code` is the CI verdict.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    from tqdm.auto import tqdm

    from medusa_toolkit.decoding.generate import resolve_tree, use_attention
    from medusa_toolkit.prompts import render_prompt

    tree = resolve_tree(tree, model)  # bad input (exit 2), checked before decoding: never a 'decoding crash'
    dtype = str(model.dtype).removeprefix("torch.")
    tolerance = default_tie_tolerance(dtype) if tie_tolerance is None else float(tie_tolerance)
    with use_attention(model, attn_implementation):  # fail fast (before any decoding) when the attention is missing
        pass
    notes = []
    if batch_size > 1:
        notes.append(
            f"Medusa decoded prompts in batches of {batch_size} (left padding, per-row KV lengths); the reference "
            "decodes each prompt alone, so this also checks that batching changes no token; per-prompt Medusa "
            "wall time is the batch's time shared out"
        )
    rendered: list[tuple[str, list[int]]] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists instead")
            rendered.append((p, render_prompt(tokenizer, p, use_chat_template, system_prompt)))
        else:
            ids = [int(t) for t in p]
            rendered.append((_text(tokenizer, ids), ids))

    results, hits = [], torch.zeros(model.num_heads, 3, dtype=torch.long)
    candidates: list[Candidate | str | None] = [None] * len(rendered)
    if batch_size > 1:
        for start in range(0, len(rendered), batch_size):
            chunk = [ids for _, ids in rendered[start : start + batch_size]]
            out = medusa_candidates(model, chunk, tree, max_new_tokens, attn_implementation)
            candidates[start : start + len(chunk)] = [out] * len(chunk) if isinstance(out, str) else out
    bar = tqdm(rendered, desc="medusa-verify", unit="prompt", disable=not progress)
    for i, (text, ids) in enumerate(bar):
        result, h = verify_prompt(
            model, tokenizer, i, text, ids, tree, max_new_tokens, attn_implementation, tolerance, candidates[i],
            reference,
        )  # fmt: skip
        results.append(result)
        hits += h
        if result.medusa_time_s > 0:
            bar.set_postfix(status=result.status, accept=f"{result.mean_accept_length:.2f}",
                            tok_s=f"{result.medusa_tokens / result.medusa_time_s:.1f}")  # fmt: skip
    summary = summarize(results, hits)
    from medusa_toolkit.model.base_model import base_identity
    from medusa_toolkit.model.tree import tree_digest

    base_name = (settings or {}).get("base")
    full_settings = {
        "base": None, "heads": None, "prompts_source": None, "available_prompts": len(rendered),
        **(settings or {}),
        # What this report vouches for, by content: the push gate and the model card check these.
        "heads_sha256": model.heads_sha256, "tree_sha256": tree_digest(tree),
        "base_fingerprint": base_identity(base_name) if isinstance(base_name, str) else None,
        "tree": {"name": tree.name, "paths": [list(p) for p in tree.paths], "num_nodes": tree.num_nodes,
                 "depth": tree.depth, "top_k": tree.top_k},
        "dtype": dtype, "attn_implementation": attn_implementation, "compiled_step": bool(model.compiled),
        "reference": REFERENCE_NAMES[reference].format(path="compiled" if model.compiled else "eager",
                                                       attn=attn_implementation),
        "reference_attn_implementation": "sdpa" if reference == "generate" else attn_implementation,
        "device": str(model.device), "max_new_tokens": max_new_tokens, "num_prompts": len(rendered),
        "batch_size": batch_size, "strict": strict, "tie_tolerance": tolerance, "min_accept_length": min_accept_length,
    }  # fmt: skip
    nonfinite = model.heads.nonfinite() if model.heads is not None else []
    full_settings["heads_finite"] = not nonfinite
    return VerifyReport(full_settings, results, summary, decide(summary, strict, min_accept_length, nonfinite), notes)


def write_outputs(report: VerifyReport, report_path: str | Path | None, junit_path: str | Path | None) -> None:
    if report_path:
        write_json(report, report_path)
    if junit_path:
        write_junit(report, junit_path)


# ----------------------------------------------------------------------------------------------------------------------
# What medusa-verify and the pipeline's verify stage share

DEFAULT_NUM_PROMPTS = 8  # prompts checked from a named set (builtin, eval, chitchat) when verify.num_prompts is null


def select_prompts(v: Any) -> tuple[list[str], int]:
    """The prompts to check and how many the source holds: every prompt of a file unless `verify.num_prompts` says
    otherwise (a CI gate given a file checks all of it), DEFAULT_NUM_PROMPTS of a named set."""
    from medusa_toolkit.prompts import load_prompts

    if v.prompts in ("chitchat", "builtin", "eval"):
        available = load_prompts(v.prompts, split="heldout")
        num = v.num_prompts or DEFAULT_NUM_PROMPTS
    else:
        available = load_prompts("file", path=v.prompts, field=v.prompt_field)
        num = v.num_prompts or len(available)
    return available[:num], len(available)


def load_verify_model(cfg: Any, heads: str | Path, tree: Any):
    """Heads (cheap, first), the tree checked against them, then the base in verify.dtype: (MedusaModel, MedusaTree)."""
    from medusa_toolkit.model.base_model import load_base_model
    from medusa_toolkit.model.heads import MedusaHeads
    from medusa_toolkit.model.medusa_model import MedusaModel
    from medusa_toolkit.model.tree import MedusaTree

    loaded = MedusaHeads.from_pretrained(heads)
    tree = MedusaTree.resolve(tree, loaded.num_heads)
    dtype = cfg.verify.dtype or cfg.model.dtype
    base, tokenizer = load_base_model(cfg.model.name_or_path, dtype=dtype, device=cfg.model.device)
    model = MedusaModel(base, loaded, tokenizer)
    from medusa_toolkit.decoding.compiled import compile_decoding

    compile_decoding(model, cfg.model.compile, cfg.verify.attn_implementation)  # both sides run the same step
    return model, tree


@dataclass
class VerifyRequest:
    """One verification as the config describes it: which heads, which tree, which prompts, every setting. The verify
    stage and medusa-verify build one (`from_config`) and run it (`run`)."""

    cfg: Any
    heads: str
    tree: str | None  # a tree.json, a preset, or None (a chain over all heads)
    run: RunDir | None = None  # the run the heads come from, if any

    @classmethod
    def from_config(cls, cfg: Any, heads: str | Path, run: RunDir | None) -> VerifyRequest:
        """The tree: `verify.tree`, else the run's tuned tree.json when the tree stage wrote one, else `tree.tree` when
        it names a preset or file, else None."""
        tree = cfg.verify.tree
        if tree is None and run is not None and run.tree_file.is_file():
            tree = str(run.tree_file)
        if tree is None:
            tree = cfg.tree.tree if cfg.tree.tree != "auto" else None
        return cls(cfg, str(heads), tree, run)

    def prompts(self) -> tuple[list[str], int]:
        return select_prompts(self.cfg.verify)

    def load(self):
        """(MedusaModel, MedusaTree): the heads first (cheap), then the base in verify.dtype."""
        return load_verify_model(self.cfg, self.heads, self.tree)

    def run_greedy(self, model: Any = None, tree: Any = None) -> VerifyReport:
        """The token-identity check of greedy Medusa decoding on the request's prompts."""
        cfg, v = self.cfg, self.cfg.verify
        prompts, available = self.prompts()
        if model is None:
            model, tree = self.load()
        return verify_heads(
            model, model.tokenizer, prompts, tree=tree, max_new_tokens=v.max_new_tokens,
            attn_implementation=v.attn_implementation, tie_tolerance=v.tie_tolerance, strict=v.strict,
            min_accept_length=v.min_accept_length, batch_size=v.batch_size,
            use_chat_template=cfg.data.use_chat_template, system_prompt=cfg.data.system_prompt, reference=v.reference,
            settings={"base": cfg.model.name_or_path, "heads": self.heads, "prompts_source": v.prompts,
                      "available_prompts": available},
            progress=cfg.logging.progress,
        )  # fmt: skip


def run_verify(run: StageRun) -> None:
    """The `verify` stage: the run's heads and tree (VerifyRequest.from_config); writes report.json and junit.xml.

    It never raises on a failed verification: the report's verdict gates export, and `medusa-train` exits with it.
    """
    if not D.is_main():
        return  # one process verifies; the runner's barrier waits for it
    report = VerifyRequest.from_config(run.cfg, run.dirs.heads, run.dirs).run_greedy()
    write_outputs(report, run.out / REPORT_FILE, run.out / JUNIT_FILE)
    print(summary_table(report))
