"""What tuning measures on: the calibration (data rows or prompts) and the validation prompts, chosen from the config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from medusa_toolkit import data_artefact
from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.tuning import TuneError
from medusa_toolkit.tuning.calibration import Calibration, CalibrationError, calibrate_prompts, calibrate_sequences


def response_start(mask: list[int]) -> int:
    """Index of the first trained (response) token; 1 when the whole row is trained."""
    return next((i for i, m in enumerate(mask) if m), len(mask))


def prompt_token_ids(
    tokenizer, prompts: list[str], use_chat_template: bool, system_prompt: str | None, max_tokens: int
) -> list[list[int]]:
    """Render prompts as decoding sees them (chat template or not), keeping the last `max_tokens` tokens."""
    from medusa_toolkit.prompts import render_prompt

    if tokenizer is None:
        raise TuneError("text prompts need the base model's tokenizer; pass a model folder that has one, or --data DIR")
    return [render_prompt(tokenizer, p, use_chat_template, system_prompt)[-max_tokens:] for p in prompts]


@dataclass
class TuningInputs:
    """What tuning measures on: the calibration, the validation prompts (token ids) with their domains, a description."""

    calibration: Calibration
    validation: list[list[int]]
    domains: list[str] | None
    source: str


def calibration_rows(
    data_dir: str | Path, allow_train: bool = False
) -> tuple[tuple[list[list[int]], list[list[int]], str] | None, str]:
    """((sequences, loss masks, where), "") from a data folder's held-out rows, or (None, why not).

    `allow_train` (a folder the user named with `medusa-tune-tree --data`): without held-out rows its training rows
    are used, with a warning (the heads may have trained on them, so acceptance looks optimistic).
    """
    art = data_artefact.load(data_dir)
    if len(art.heldout):
        return (*data_artefact.token_rows(art.heldout), art.heldout_where), ""
    if allow_train and len(art.train):
        warnings.warn(f"{art.where}: no held-out rows, so calibrating on rows the heads may have trained on; "
                      "acceptance will look optimistic", stacklevel=2)  # fmt: skip
        return (*data_artefact.token_rows(art.train), f"{art.where} (no held-out rows)"), ""
    if allow_train:
        raise CalibrationError(f"{data_dir} is empty: no calibration rows; regenerate it with rows in it")
    return None, f"the data artefact {data_dir} has no held-out rows (data.eval_fraction: 0)"


def calibration_inputs(
    cfg: ToolkitConfig, model: MedusaModel, data_dir: Path | None = None, allow_train: bool = False, log=print
) -> TuningInputs:
    """Calibrate, and pick the validation prompts.

    Calibration: with `tree.calibrate_on: data`, the data stage's held-out rows when `data_dir` has them (one forward
    each: the rows are the base's own greedy text), else `tree.prompts` (greedy decoding). Validation:
    `tree.validation_prompts`: `eval` (default: the repo's multi-domain set from sources never used for training,
    interleaved across chat, instructions, code and math, so the choice is checked on traffic unlike the training
    prompts), `calibration` (further prompts from the calibration source), builtin, chitchat or a file. When both
    come from the eval set, calibration takes the prompts after the validation ones: a tree is never checked on the
    prompts it was fitted to.
    """
    from medusa_toolkit.prompts import eval_prompts, interleave_domains, load_prompts

    tc, d = cfg.tree, cfg.data
    depth = resolve_depth(tc.max_depth, model.num_heads)
    use_rows = tc.calibrate_on == "data" and data_dir is not None and Path(data_dir).is_dir()
    rows, why_not = calibration_rows(data_dir, allow_train) if use_rows else (None, "")
    if why_not:
        log(f"tree: {why_not}; calibrating on tree.prompts ({tc.prompts}) instead")
    n_cal, n_val = tc.num_calibration_prompts, tc.num_validation_prompts

    def render(texts: list[str]) -> list[list[int]]:
        return prompt_token_ids(model.tokenizer, texts, d.use_chat_template, d.system_prompt, d.max_prompt_tokens)

    if rows is not None:
        seqs, masks, where = rows
        starts = [min(response_start(m), len(s)) for s, m in zip(seqs, masks)]
        calib = calibrate_sequences(model, seqs[:n_cal], starts[:n_cal], depth, tc.top_k, cfg.logging.progress)
        rest = list(zip(seqs, starts))[n_cal:] or list(zip(seqs, starts))
        same_source = [s[:st] for s, st in rest if st > 0][:n_val]
        source = f"data rows {where} ({min(n_cal, len(seqs))} rows)"
        log(f"tree: calibrating on {source}")
    else:
        if tc.prompts == "eval" and tc.validation_prompts == "eval":
            texts = load_prompts("eval")[n_val : n_val + n_cal]  # after the ones validation decodes
        elif tc.prompts in ("chitchat", "builtin", "eval"):
            texts = load_prompts(tc.prompts, split="heldout", num=n_cal + n_val)
        else:
            texts = load_prompts("file", path=tc.prompts, field=tc.prompt_field, num=n_cal + n_val)
        prompts = render(texts)
        calib = calibrate_prompts(model, prompts[:n_cal], tc.calibration_max_new_tokens, depth, tc.top_k,
                                  progress=cfg.logging.progress)  # fmt: skip
        same_source = (prompts[n_cal:] or prompts)[:n_val]
        source = f"{tc.prompts} prompts ({min(n_cal, len(prompts))}, greedy)" + (f"; {why_not}" if why_not else "")
    if tc.validation_prompts == "calibration":
        return TuningInputs(calib, same_source, None, source)
    if tc.validation_prompts == "eval":
        pairs = interleave_domains(eval_prompts())[:n_val]
        return TuningInputs(calib, render([p for _, p in pairs]), [dom for dom, _ in pairs], source)
    if tc.validation_prompts in ("chitchat", "builtin"):
        texts = load_prompts(tc.validation_prompts, split="heldout", num=n_val)
    else:
        texts = load_prompts("file", path=tc.validation_prompts, field=tc.prompt_field, num=n_val)
    return TuningInputs(calib, render(texts), None, source)


def resolve_depth(max_depth: int | None, num_heads: int) -> int:
    if max_depth is None:
        return num_heads
    if not 1 <= max_depth <= num_heads:
        raise TuneError(f"max depth {max_depth} must be between 1 and the number of heads ({num_heads})")
    return max_depth
