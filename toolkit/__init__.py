"""medusa-toolkit: train, tune, verify and ship Medusa speculative-decoding heads for Hugging Face causal LMs."""

import importlib.util

# train/, verify/, export/ and kernels/ hold no __init__.py: they are namespace folders, so with the repository root on
# sys.path (`python -m`, `python -c`, a REPL started in a clone) an installed package of the same name still wins over
# ours; transformers imports Hugging Face's `kernels`. setuptools' default editable mode cannot map such a folder under
# a regular package, so an install made with a plain `pip install -e .` would fail later, and far from the cause.
if importlib.util.find_spec("medusa_toolkit.kernels") is None:
    raise ImportError(
        "medusa_toolkit is installed without its kernels/ folder (a plain `pip install -e .`): reinstall with "
        "`pip install -e . --config-settings editable_mode=strict` (what `make bootstrap` runs) or `pip install .`"
    )

from medusa_toolkit.config import ConfigError, ToolkitConfig, load_config  # noqa: E402
from medusa_toolkit.decoding.generate import (  # noqa: E402
    BatchGenerateOutput,
    MedusaGenerateOutput,
    medusa_generate,
    medusa_generate_batch,
)
from medusa_toolkit.model.base_model import ModelLoadError, load_base_model  # noqa: E402
from medusa_toolkit.model.heads import HeadsLoadError, MedusaHeads  # noqa: E402
from medusa_toolkit.model.medusa_model import MedusaModel, MedusaOutput  # noqa: E402
from medusa_toolkit.model.tree import MedusaTree, TreeError  # noqa: E402
from medusa_toolkit.version import __version__  # noqa: E402

__all__ = [
    "BatchGenerateOutput",
    "ConfigError",
    "HeadsLoadError",
    "MedusaGenerateOutput",
    "MedusaHeads",
    "MedusaModel",
    "MedusaOutput",
    "MedusaTree",
    "ModelLoadError",
    "ToolkitConfig",
    "TreeError",
    "__version__",
    "load_base_model",
    "load_config",
    "medusa_generate",
    "medusa_generate_batch",
]
