"""The `tree` stage and what medusa-tune-tree runs: load heads then the base, calibrate, tune, validate, write."""

from __future__ import annotations

from pathlib import Path

from medusa_toolkit import distributed as D
from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.model.heads import MedusaHeads
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.run_dir import TREE_FILE
from medusa_toolkit.tuning import TuneError
from medusa_toolkit.tuning.inputs import calibration_inputs, resolve_depth
from medusa_toolkit.tuning.timing import LatencyProfile, profile_latency
from medusa_toolkit.tuning.tune import tune_tree


def load_tuning_model(cfg: ToolkitConfig, heads: MedusaHeads) -> MedusaModel:
    """The base with these heads, decoding as the config says (attention, compiled step) for timing and validation."""
    from medusa_toolkit.decoding.compiled import compile_decoding
    from medusa_toolkit.model.base_model import load_base_model

    m = cfg.model
    base, tokenizer = load_base_model(m.name_or_path, m.dtype, m.device, m.attn_implementation)
    model = MedusaModel(base, heads, tokenizer)
    compile_decoding(model, m.compile, m.attn_implementation)
    return model


def profile_from_config(cfg: ToolkitConfig, heads: str | Path, out_file: Path) -> LatencyProfile:
    """`medusa-tune-tree --profile-latency OUT.json`: this machine's step-time curve for these heads and this base."""
    tc, m = cfg.tree, cfg.model
    model = load_tuning_model(cfg, MedusaHeads.from_pretrained(heads))
    profile = profile_latency(model, tc.max_nodes, tc.prefix_length, tc.batch_size, m.attn_implementation,
                              tc.latency_repeats, cfg.logging.progress)  # fmt: skip
    profile.save(out_file)
    curve = ", ".join(f"{n}: {1e3 * t:.1f}" for n, t in zip(profile.nodes, profile.step_time_s))
    print(f"latency profile of {profile.machine['device']} (ms per step by nodes: {curve}) -> {out_file}")
    return profile


def tune_from_config(
    cfg: ToolkitConfig, heads: str | Path, out_file: Path, data_dir: Path | None = None, allow_train: bool = False
) -> None:
    """What the stage and medusa-tune-tree do: load heads then the base, calibrate, tune, validate, write."""
    tc = cfg.tree
    loaded = MedusaHeads.from_pretrained(heads)  # cheap: a bad folder fails before the base loads
    if tc.tree != "auto":  # a fixed tree: record it, no tuning
        tree = MedusaTree.resolve(tc.tree, loaded.num_heads)
        tree.metadata = {**tree.metadata, "source": tc.tree}
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tree.save(out_file)
        return
    resolve_depth(tc.max_depth, loaded.num_heads)
    if tc.top_k > loaded.head_vocab_size:
        raise TuneError(f"tree.top_k is {tc.top_k}, but these heads score {loaded.head_vocab_size} tokens; "
                        f"use tree.top_k <= {loaded.head_vocab_size}")  # fmt: skip
    m = cfg.model
    profile = LatencyProfile.load(Path(tc.latency_profile).expanduser()) if tc.latency_profile else None
    model = load_tuning_model(cfg, loaded)
    if profile is not None:
        profile.check_fits(model, tc.latency_profile)
    inputs = calibration_inputs(cfg, model, data_dir, allow_train)
    tune_tree(
        model, inputs.calibration, tc, out_file, attn=m.attn_implementation, calibration_source=inputs.source,
        validation_prompts=inputs.validation if tc.num_validation_prompts else None,
        validation_domains=inputs.domains, progress=cfg.logging.progress, profile=profile,
        profile_source=tc.latency_profile,
    )  # fmt: skip


def run_tree(run: StageRun) -> None:
    """The `tree` stage: tune from the run's heads on its held-out data, write tree.json and PNG plots."""
    if not D.is_main():
        return  # one process measures; others would compete for the same cores and skew the latency
    if not run.dirs.heads.is_dir():
        raise TuneError(f"no heads in {run.dirs.heads}; run the 'train' stage first")
    tune_from_config(run.cfg, run.dirs.heads, run.out / TREE_FILE, run.dirs.data)
