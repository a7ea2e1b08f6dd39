"""medusa-toolkit: train, tune, verify and ship Medusa speculative-decoding heads for Hugging Face causal LMs."""

from medusa_toolkit.base_model import ModelLoadError, load_base_model
from medusa_toolkit.config import ConfigError, ToolkitConfig, load_config
from medusa_toolkit.decoding import BatchGenerateOutput, MedusaGenerateOutput, medusa_generate, medusa_generate_batch
from medusa_toolkit.heads import HeadsLoadError, MedusaHeads
from medusa_toolkit.medusa_model import MedusaModel, MedusaOutput
from medusa_toolkit.tree import MedusaTree, TreeError
from medusa_toolkit.version import __version__

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
