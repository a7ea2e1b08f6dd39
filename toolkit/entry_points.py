"""The one place toolkit/ names code that lives in train/, verify/ and export/: as "module:function" strings, imported
on first use. Imports run one way (train, verify and export import toolkit, never the reverse), yet the stage runner
runs their stages and `MedusaHeads.push_to_hub` publishes through export's packaging and gate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGE_FUNCTIONS = {
    "data": "medusa_toolkit.train.data.stage:run_data",
    "train": "medusa_toolkit.train.trainer:run_train",
    "tree": "medusa_toolkit.tuning.stage:run_tree",
    "verify": "medusa_toolkit.verify.verifier:run_verify",
    "export": "medusa_toolkit.export.stage:run_export",
}
PUSH_HEADS = "medusa_toolkit.export.stage:push_heads"


def load(target: str) -> Callable[..., Any]:
    """The function a "module:function" string names."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)
