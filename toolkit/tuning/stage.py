"""The `tree` stage and what medusa-tune-tree runs: load heads then the base, calibrate, tune, validate, write."""

from __future__ import annotations

from pathlib import Path

from medusa_toolkit.config import ToolkitConfig
from medusa_toolkit.model.medusa_model import MedusaModel
from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning import TuneError
from medusa_toolkit.tuning.inputs import calibration_inputs, resolve_depth
from medusa_toolkit.tuning.tune import TREE_FILE, tune_tree


def tune_from_config(
    cfg: ToolkitConfig, heads: str | Path, out_file: Path, data_dir: Path | None = None, allow_train: bool = False
) -> None:
    """What the stage and medusa-tune-tree do: load heads then the base, calibrate, tune, validate, write."""
    from medusa_toolkit.model.base_model import load_base_model
    from medusa_toolkit.model.heads import MedusaHeads

    tc = cfg.tree
    loaded = MedusaHeads.from_pretrained(heads)  # cheap: a bad folder fails before the base loads
    if tc.tree != "auto":  # a fixed tree: record it, no tuning
        tree = MedusaTree.resolve(tc.tree, loaded.num_heads)
        tree.metadata = {**tree.metadata, "source": tc.tree}
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tree.save(out_file)
        return
    resolve_depth(tc.max_depth, loaded.num_heads)
    m = cfg.model
    base, tokenizer = load_base_model(m.name_or_path, m.dtype, m.device, m.attn_implementation)
    model = MedusaModel(base, loaded, tokenizer)
    inputs = calibration_inputs(cfg, model, data_dir, allow_train)
    tune_tree(
        model, inputs.calibration, tc, out_file, attn=m.attn_implementation, calibration_source=inputs.source,
        validation_prompts=inputs.validation if tc.num_validation_prompts else None,
        validation_domains=inputs.domains, progress=cfg.logging.progress,
    )  # fmt: skip


def run_tree(cfg: ToolkitConfig, run_dir: Path, out_dir: Path) -> None:
    """The `tree` stage: tune from run_dir/heads on held-out data, write out_dir/tree.json and PNG plots."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one process measures; others would compete for the same cores and skew the latency
    run_dir = Path(run_dir)
    if not (run_dir / "heads").is_dir():
        raise TuneError(f"no heads in {run_dir / 'heads'}; run the 'train' stage first")
    tune_from_config(cfg, run_dir / "heads", Path(out_dir) / TREE_FILE, run_dir / "data")
