"""Two ranks, ZeRO-3 partitioned base, memory teacher cache: rank 0 holds batch [0]'s hidden states, rank 1 does not.

Both must still run the base's forward (a collective under ZeRO-3): a rank that skipped it alone would leave the other
waiting for its all-gathers forever. Writes each rank's result for the test to compare with the unpartitioned base.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_toolkit import distributed as D
from medusa_toolkit.config import config_from_dict
from medusa_toolkit.train import trainer
from medusa_toolkit.train.teacher import Teacher

model_dir, out = sys.argv[1], Path(sys.argv[2])
D.init_distributed()
cfg = config_from_dict({"model": {"name_or_path": model_dir}, "train": {"deepspeed": {"zero_stage": 3}}})
ds = trainer.deepspeed_config(cfg)
ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
trainer.batch_geometry(ds, D.world_size())
base, _, keep = trainer.load_frozen_base(cfg, ds, torch.device("cpu"))
teacher = Teacher(base, "memory")
ids = torch.arange(1, 9).view(1, 8) * (D.rank() + 1)
if D.rank() == 0:
    teacher.cache[0] = torch.zeros(8, base.config.hidden_size)  # a cache hit on rank 0 only
hidden = teacher([0], ids, [8])
D.barrier()
save_file({"ids": ids, "hidden": hidden.contiguous()}, str(out / f"rank{D.rank()}.safetensors"))
