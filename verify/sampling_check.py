"""Statistical check that Medusa sampling keeps the base model's sampling distribution.

For each prompt, draw `samples` continuations of `num_tokens` tokens twice: from the base model's own sampler (same
temperature / top-k / top-p warpers) and from `medusa_sample`, each run with its own draws from one seeded generator.
The joint law of the first `num_tokens` tokens, and each token's marginal (the joint is sparse on a flat
distribution; a marginal still sees the bias), are compared with two-sample chi-square tests of homogeneity
(`scipy.stats.chi2_contingency`, no continuity correction); categories seen fewer than `min_count` times in both
samples together are pooled so every expected count is >= min_count / 2. For each test, statistics and degrees of
freedom of the prompts (independent) are summed; the tests are combined with a Bonferroni correction (m tests: p =
m * min p). The check passes when that p-value is >= `alpha`, so a lossless sampler fails with probability <= alpha
(the false-alarm rate); every draw is seeded, so a given run is reproducible. If every category was too rare to test,
the result is "inconclusive" and counts as a failure.
EOS is ignored (`eos_token_id=[]` on both sides) so every sample has exactly `num_tokens` tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from medusa_toolkit.decoding.sampling import ACCEPTANCE, logits_processor, medusa_sample, probabilities
from medusa_toolkit.model.medusa_model import MedusaModel

SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int}


@dataclass
class SamplingReport:
    """Outcome of `check_sampling`. statistic/dof: of the worst test, summed over prompts; p_value: Bonferroni-combined
    over the tests; tv_distance: mean empirical TV distance of the joint law over prompts."""

    passed: bool
    statistic: float
    p_value: float
    dof: int
    alpha: float
    samples: int
    num_tokens: int
    sampling: dict
    acceptance: str
    tv_distance: float
    worst_test: str = "joint"  # the test with the smallest p-value: "joint" or "tokenK" (K-th token's marginal)
    tests: dict = field(default_factory=dict)  # name -> statistic, dof, p_value (summed over prompts)
    inconclusive: bool = False  # all categories too rare to test (counts as a failure: raise --samples)
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else ("FAIL (inconclusive: raise --samples)" if self.inconclusive else "FAIL")
        spec = ",".join(f"{k}={v}" for k, v in self.sampling.items()) or "defaults"
        return (
            f"sampling check ({self.acceptance}, {spec}): {verdict}  chi2={self.statistic:.1f} dof={self.dof} "
            f"[{self.worst_test}] p={self.p_value:.3g} (alpha={self.alpha})  TV~{self.tv_distance:.3f}  "
            f"{self.samples} samples/prompt x {len(self.per_prompt)} prompts, first {self.num_tokens} tokens"
        )


def parse_sampling_spec(spec: str) -> dict:
    """Parse "temperature=0.8,top_p=0.95,top_k=50" into {"temperature": 0.8, "top_p": 0.95, "top_k": 50} (validated)."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SAMPLING_KEYS:
            raise ValueError(
                f"bad sampling setting {item!r}: use key=value pairs with keys {', '.join(SAMPLING_KEYS)}, "
                "e.g. temperature=0.8,top_p=0.95"
            )
        try:
            out[key] = SAMPLING_KEYS[key](value)
        except ValueError:
            raise ValueError(f"sampling setting {key} needs a {SAMPLING_KEYS[key].__name__}, got {value!r}") from None
    logits_processor(**out)  # validates ranges
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Samplers


@torch.inference_mode()
def sample_base(
    model: MedusaModel,
    prompt: torch.Tensor,
    sampling: dict,
    samples: int,
    num_tokens: int,
    generator: torch.Generator,
    chunk: int = 256,
) -> torch.Tensor:
    """[samples, num_tokens] ancestral samples from the base: one prompt prefill, then `chunk` rows at a time."""
    base, warpers = model.base, logits_processor(**sampling)
    prompt = prompt.to(model.device)[None]
    cache = DynamicCache(config=base.config)
    positions = torch.arange(prompt.shape[1], device=prompt.device)[None]
    first = probabilities(base(prompt, position_ids=positions, cache=cache, logits_to_keep=1).logits[0, -1], warpers)
    out = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        rows = copy.deepcopy(cache)
        rows.batch_repeat_interleave(n)
        tok = torch.multinomial(first.expand(n, -1), 1, generator=generator)
        toks = [tok]
        for i in range(1, num_tokens):
            pos = torch.full((n, 1), prompt.shape[1] + i - 1, device=prompt.device)
            logits = base(tok, position_ids=pos, cache=rows, logits_to_keep=1).logits[:, -1]
            tok = torch.multinomial(probabilities(logits, warpers), 1, generator=generator)
            toks.append(tok)
        out.append(torch.cat(toks, 1))
    return torch.cat(out).cpu()


def sample_medusa(
    model: MedusaModel,
    prompt: torch.Tensor,
    sampling: dict,
    samples: int,
    num_tokens: int,
    generator: torch.Generator,
    sampler: Callable = medusa_sample,
    progress: tqdm | None = None,
    **sampler_kwargs,
) -> torch.Tensor:
    """[samples, num_tokens] from `samples` independent Medusa runs."""
    out = []
    for _ in range(samples):
        res = sampler(
            model, prompt[None], num_tokens, generator=generator, eos_token_id=[], **sampling, **sampler_kwargs
        )
        out.append(res.sequences[0, prompt.numel() :].cpu())
        if progress is not None:
            progress.update(1)
    return torch.stack(out)


def two_sample_chi2(a: Sequence[tuple], b: Sequence[tuple], min_count: int = 10) -> tuple[float, int, float]:
    """Chi-square homogeneity test of two categorical samples: (statistic, dof, empirical TV distance)."""
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: (-(ca[k] + cb[k]), k))
    big = [k for k in keys if ca[k] + cb[k] >= min_count]
    small = [k for k in keys if ca[k] + cb[k] < min_count]
    cols = [[ca[k], cb[k]] for k in big]
    rest = [sum(ca[k] for k in small), sum(cb[k] for k in small)]
    if sum(rest) >= min_count or not cols:
        cols.append(rest)
    elif sum(rest):
        cols[-1] = [cols[-1][0] + rest[0], cols[-1][1] + rest[1]]  # too few to stand alone: join the rarest
    tv = 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in keys)
    cols = [c for c in cols if sum(c)]
    if len(cols) < 2:
        return 0.0, 0, tv
    from scipy import stats  # imported here: only the sampling check needs scipy

    statistic, _, dof, _ = stats.chi2_contingency(torch.tensor(cols).T.numpy(), correction=False)
    return float(statistic), int(dof), tv


def check_sampling(
    model: MedusaModel,
    prompts: Sequence[torch.Tensor | list[int]],
    sampling: dict,
    samples: int,
    num_tokens: int = 2,
    alpha: float = 0.001,
    seed: int = 0,
    acceptance: str = "lossless",
    tree=None,
    attn_implementation: str | None = None,
    sampler: Callable = medusa_sample,
    min_count: int = 10,
    progress: bool = True,
) -> SamplingReport:
    """Compare the first `num_tokens` tokens under base sampling and Medusa sampling (see the module docstring).

    `prompts`: token-id tensors or lists. `sampler`: the Medusa sampler under test (a `medusa_sample`-like callable;
    tests pass deliberately biased ones). Fails (passed=False) when the combined p-value is below `alpha`.
    """
    if samples < 2 * min_count:
        raise ValueError(f"--samples must be >= {2 * min_count} for a chi-square test, got {samples}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not prompts:
        raise ValueError("check_sampling needs at least one prompt")
    logits_processor(**sampling)  # fail fast on bad settings
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    base_gen = torch.Generator(model.device).manual_seed(seed)
    medusa_gen = torch.Generator(model.device).manual_seed(seed + 1)
    kwargs = {"tree": tree, "acceptance": acceptance, "attn_implementation": attn_implementation}

    names = ["joint"] + ([f"token{j + 1}" for j in range(num_tokens)] if num_tokens > 1 else [])
    sums = {n: [0.0, 0] for n in names}  # statistic, dof summed over prompts (independent tests)
    tvs, per_prompt, distinct = [], [], False
    bar = tqdm(total=samples * len(prompts), desc="medusa sampling runs", unit="run", disable=not progress)
    for i, prompt in enumerate(prompts):
        ref = sample_base(model, prompt, sampling, samples, num_tokens, base_gen).tolist()
        got = sample_medusa(model, prompt, sampling, samples, num_tokens, medusa_gen, sampler, bar, **kwargs).tolist()
        row = {"prompt": i}
        for n in names:
            pick = (lambda r: tuple(r)) if n == "joint" else (lambda r, j=int(n[5:]) - 1: (r[j],))
            s, d, tv = two_sample_chi2([pick(r) for r in ref], [pick(r) for r in got], min_count)
            sums[n][0] += s
            sums[n][1] += d
            row[n] = {"statistic": s, "dof": d, "p_value": _p(s, d), "tv_distance": tv}
            distinct |= len({pick(r) for r in ref + got}) > 1
        tvs.append(row["joint"]["tv_distance"])
        per_prompt.append(row)
    bar.close()
    tests = {n: {"statistic": st, "dof": d, "p_value": _p(st, d)} for n, (st, d) in sums.items()}
    informative = [n for n in names if tests[n]["dof"] > 0]
    # Bonferroni over the joint and per-position tests: the combined p-value is still a valid p-value.
    worst = min(informative, key=lambda n: tests[n]["p_value"]) if informative else "joint"
    p_value = min(1.0, len(informative) * tests[worst]["p_value"]) if informative else 1.0
    inconclusive = distinct and not informative  # every category too rare to test: more samples needed
    return SamplingReport(
        passed=p_value >= alpha and not inconclusive, statistic=tests[worst]["statistic"], p_value=p_value,
        dof=tests[worst]["dof"], alpha=alpha, samples=samples, num_tokens=num_tokens, sampling=dict(sampling),
        acceptance=acceptance, tv_distance=sum(tvs) / len(tvs), worst_test=worst, tests=tests,
        inconclusive=inconclusive, per_prompt=per_prompt,
    )  # fmt: skip


def _p(statistic: float, dof: int) -> float:
    from scipy import stats

    return float(stats.chi2.sf(statistic, dof)) if dof > 0 else 1.0


# ----------------------------------------------------------------------------------------------------------------------
# CLI glue for medusa-verify


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling-check options of medusa-verify."""
    g = parser.add_argument_group("sampling check (instead of the greedy check when --sampling is given)")
    g.add_argument(
        "--sampling", default=None, help="check Medusa *sampling* instead of greedy, e.g. temperature=0.8,top_p=0.95"
    )
    g.add_argument("--samples", type=int, default=1000, help="Medusa runs (and base samples) per prompt")
    g.add_argument("--sampling-tokens", type=int, default=2, help="compare the joint law of the first N new tokens")
    g.add_argument("--sampling-alpha", type=float, default=0.001, help="significance: fail when p-value < alpha")
    g.add_argument("--sampling-acceptance", choices=ACCEPTANCE, default="lossless", help="Medusa acceptance rule")
    g.add_argument("--sampling-seed", type=int, default=0)


def run_sampling_cli(
    args: argparse.Namespace, model: MedusaModel, prompt_ids: Sequence[list[int]], tree, attn: str, progress: bool
) -> int:
    """Run the check for medusa-verify; prints the verdict, writes --report if set. Exit 0 pass, 1 fail."""
    from medusa_toolkit.config import ConfigError

    try:
        sampling = parse_sampling_spec(args.sampling)
        if args.samples < 20 or args.sampling_tokens < 1 or not 0 < args.sampling_alpha < 1:
            raise ValueError("need --samples >= 20, --sampling-tokens >= 1 and 0 < --sampling-alpha < 1")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    report = check_sampling(
        model, list(prompt_ids), sampling, args.samples, num_tokens=args.sampling_tokens, alpha=args.sampling_alpha,
        seed=args.sampling_seed, acceptance=args.sampling_acceptance, tree=tree, attn_implementation=attn,
        progress=progress,
    )  # fmt: skip
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps({"sampling_check": report.to_dict()}, indent=2) + "\n")
    print(report.summary())
    return 0 if report.passed else 1
