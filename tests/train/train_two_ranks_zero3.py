"""Train on every rank (under torchrun) with a ZeRO-3 partitioned base; write each rank's share of the base."""

import json
import sys
from pathlib import Path

from medusa_toolkit import distributed as D
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.pipeline.stages import StageRun
from medusa_toolkit.train import trainer

cfg_path, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
original = trainer.load_frozen_base


def recording_load(*args, **kwargs):
    base, head, keep = original(*args, **kwargs)
    params = list(base.parameters())
    share = {
        "local": sum(p.ds_tensor.numel() for p in params),  # this rank's partition
        "total": sum(p.ds_numel for p in params),
        "resident": sum(p.data.numel() for p in params),  # full tensors held outside a forward: none
    }
    (cfg_path.parent / f"share{D.rank()}.json").write_text(json.dumps(share))
    return base, head, keep


trainer.load_frozen_base = recording_load
D.init_distributed()
out = run_dir / "heads"
out.mkdir(parents=True, exist_ok=True)
trainer.train(StageRun.prepare(config_from_dict(json.loads(cfg_path.read_text())), run_dir, "train", out))
