"""Run data + train on every rank (under torchrun) and write each rank's heads digest: the test compares them."""

import hashlib
import json
import sys
from pathlib import Path

from medusa_toolkit import distributed as D
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.pipeline.stages import run_pipeline
from medusa_toolkit.train import trainer

cfg_path, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
original = trainer.train


def recording_train(*args, **kwargs):
    heads = original(*args, **kwargs)
    h = hashlib.sha256()
    for name, t in sorted(heads.state_dict().items()):
        h.update(name.encode() + t.detach().float().numpy().tobytes())
    (cfg_path.parent / f"rank{D.rank()}.txt").write_text(h.hexdigest())
    return heads


trainer.train = recording_train
D.init_distributed()
run_pipeline(
    config_from_dict(json.loads(cfg_path.read_text())),
    run_dir,
    ["data", "train"],
    log=print if D.is_main() else (lambda *a: None),
)
