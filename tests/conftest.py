"""Test-wide environment: CPU Triton interpreter, no network, no wandb uploads, tests/ helpers importable."""

import os
import sys
from pathlib import Path

import torch

# The Triton interpreter must be switched on before any @triton.jit function is decorated, i.e. before
# medusa_toolkit.kernels is imported by any test module: CI has no GPU, so kernel tests run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "medusa-toolkit" / "torch_extensions"))

# tests/tiny.py and other helpers import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
