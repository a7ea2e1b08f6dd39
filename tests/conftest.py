"""Test-wide environment (CPU Triton interpreter, no network, no wandb uploads) and the fixtures several rooms share.

Helpers live in the package (`medusa_toolkit.testing`), not in tests/: nothing here is put on sys.path.
"""

import os
from pathlib import Path

import pytest
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

# huggingface_hub reads these when it is imported: set them first, so nothing in the suite waits on the network.
from huggingface_hub import constants as hub_constants  # noqa: E402

# A local Hub-compatible server for push tests (medusa_toolkit.testing.hub_server), with the real huggingface_hub client
# online.
from medusa_toolkit.testing.hub_server import HubServer  # noqa: E402
from medusa_toolkit.testing.tiny import tiny_model_dir  # noqa: E402

HUB_TOKEN = "hf_test_token"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode against a local endpoint; huggingface_hub read these at import time, so patch the constants too."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def start(**kw) -> HubServer:
        hub = HubServer(**kw).__enter__()
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        servers.append(hub)
        return hub

    servers: list[HubServer] = []
    yield start
    for hub in servers:
        hub.__exit__(None, None, None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the byte tokenizer as a model folder (`tiny_model_dir`), built once; read-only."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(autouse=True)
def no_leaked_world_of_one():
    """A test that trains in-process makes a world of one (RANK, WORLD_SIZE, MASTER_ADDR/PORT in os.environ) whose
    process group lives on in this process. A subprocess started by a later test would inherit those variables,
    take them for a launcher's and try to listen on the port this process still holds (EADDRINUSE). After every test,
    remove those the session did not start with (a module fixture may have set them before the test began);
    LOCAL_RANK stays, because DeepSpeed reads it from the environment at every `initialize`."""
    yield
    for key in LAUNCHER_VARIABLES:
        if key not in LAUNCHER_AT_START:
            os.environ.pop(key, None)


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_AT_START = {k for k in LAUNCHER_VARIABLES if k in os.environ}
