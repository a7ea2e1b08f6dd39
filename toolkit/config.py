"""The toolkit's typed configuration: one YAML file, one dataclass per section.

Every stage reads only its own section (plus `model`/`heads`). Values are validated when the config is loaded, so a
typo or a bad value fails before any model is loaded, with the key path, the allowed values and a "did you mean".
Each section is a plain dataclass: adding a knob is adding a field with a default and a comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medusa_toolkit.errors import ToolkitError

DType = Literal["float32", "bfloat16", "float16"]
AttnImpl = Literal["sdpa", "eager", "medusa_flash_decoding"]


class ConfigError(ToolkitError, ValueError):
    """A config value or key is wrong; the message names the key path and the fix."""


@dataclass
class ModelConfig:
    # Hub id, local HF folder, a .gguf file, or the builtin alias `smollm2-135m-instruct` (offline).
    name_or_path: str = "smollm2-135m-instruct"
    dtype: DType = "float32"
    # None: CUDA when available, else CPU.
    device: str | None = None
    # Attention used by Medusa decoding (verification and plain decoding steps).
    attn_implementation: AttnImpl = "sdpa"


@dataclass
class HeadsConfig:
    num_heads: int = 4
    num_layers: int = 1
    head_type: Literal["per_head_lm_head", "shared_lm_head"] = "per_head_lm_head"
    # Start from existing heads (folder or Hub id) instead of fresh ones.
    init_from: str | None = None


@dataclass
class DataConfig:
    # Where prompts come from: chitchat (offline package), file (jsonl/json/parquet/csv/txt), hf (datasets name),
    # builtin (8 fixed smoke-test prompts), none (unconditional samples from BOS).
    source: Literal["chitchat", "file", "hf", "builtin", "none"] = "chitchat"
    # File path (source=file) or dataset name (source=hf).
    path: str | None = None
    field: str = "prompt"
    split: str = "train"
    num_prompts: int = 256
    use_chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 8
    # Train on the prompt tokens too (the response is always trained on).
    train_on_prompt: bool = False
    # Fraction of sequences held out for evaluation.
    eval_fraction: float = 0.05
    shard_size: int = 64
    seed: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    # A DeepSpeed JSON file; when set it is used as the base and the fields above fill only what it leaves out.
    config_file: str | None = None


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss: Literal["ce", "kl"] = "ce"
    kl_temperature: float = 1.0
    kl_top_k: int | None = None
    # Per-head loss weight decay**k (Medusa-2).
    head_weight_decay: float = 0.8
    # Keep the frozen base's last hidden states per sequence after their first use: later epochs and evals skip the
    # base forward (in memory; the kl teacher logits are lm_head(hidden), so nothing else needs caching).
    teacher_cache: bool = False
    eval_every: int = 50
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # Continue from the latest checkpoint in RUN_DIR/checkpoints (`medusa-train --resume` sets it). Not a stage input:
    # a resumed run ends with the same heads as an uninterrupted one.
    resume: bool = False
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class TreeConfig:
    # A preset name (chain-N, mc_sim_7b_63), a tree.json path, or `auto` (tune from measured acceptance).
    tree: str = "auto"
    max_nodes: int = 64
    max_depth: int | None = None
    top_k: int = 10
    # speed: max predicted tokens/s from measured step latency; acceptance: max expected accepted length.
    objective: Literal["speed", "acceptance"] = "speed"
    # Held-out prompts (or data-stage eval rows) whose greedy text calibrates the acceptance tables.
    num_calibration_prompts: int = 32
    calibration_max_new_tokens: int = 64
    # Further held-out prompts decoded to check the prediction (and compare presets); 0 skips the check.
    num_validation_prompts: int = 8
    # Batch size and KV-cache prefix length at which one verification step is timed.
    batch_size: int = 1
    prefix_length: int = 256
    # Timed repeats per node budget (the median is used).
    latency_repeats: int = 5


@dataclass
class VerifyConfig:
    # Prompts: chitchat (its held-out split), builtin, or a file (.jsonl/.json/.parquet/.csv with `prompt_field`, .txt).
    prompts: str = "chitchat"
    prompt_field: str = "prompt"
    num_prompts: int = 8
    # Tokens generated per prompt by both the reference and Medusa.
    max_new_tokens: int = 64
    # None: model.dtype.
    dtype: DType | None = None
    # Attention of the Medusa side (the reference always uses sdpa).
    attn_implementation: AttnImpl = "medusa_flash_decoding"
    # Prompts Medusa decodes together (batched decoding, per-row KV lengths); references always run one at a time.
    batch_size: int = 1
    # Count numerical ties as failures too.
    strict: bool = False
    # Logit gap under which a divergence is a tie; None: per-dtype default (verify/verifier.py TIE_TOLERANCE).
    tie_tolerance: float | None = None
    # Fail (exit 3) when the mean accepted tokens per step is below this; None: no acceptance gate.
    min_accept_length: float | None = None
    # Tree to verify (preset or tree.json); None: the tree stage's tree.json, else tree.tree, else a chain.
    tree: str | None = None


@dataclass
class ExportConfig:
    # Packages to write under run_dir/export/: medusa (upstream Medusa / TGI / TensorRT-LLM) and vllm.
    formats: list[Literal["medusa", "vllm"]] = field(default_factory=lambda: ["medusa", "vllm"])
    # ORG/NAME to push the medusa package to (the vllm package goes to ORG/NAME-vllm); null: no push.
    push_to_hub: str | None = None
    private: bool = False
    # Branch to push to (created if missing); null: main.
    revision: str | None = None
    # Open a pull request instead of committing to the branch.
    create_pr: bool = False
    commit_message: str | None = None
    # Push heads whose verification failed or is missing (refused by default).
    allow_unverified: bool = False
    # Weight dtype in the packages; null keeps the heads' dtype.
    dtype: DType | None = None
    # Save the base tokenizer into the medusa package (TGI reads the tokenizer from --model-id).
    include_tokenizer: bool = True


@dataclass
class LoggingConfig:
    wandb_mode: Literal["online", "offline", "disabled", "auto"] = "auto"
    wandb_project: str = "medusa-toolkit"
    run_name: str | None = None
    progress: bool = True


@dataclass
class ToolkitConfig:
    output_dir: str = "runs/default"
    stages: list[str] = field(default_factory=lambda: ["data", "train", "tree", "verify", "export"])
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------------
# Parsing and validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the type annotation `tp`; return it (ints accepted where floats are expected)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{path}': got {value!r}; expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{path}': expected null, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"config key '{path}': {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}{hint}"
        )
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}': expected {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}': expected a mapping (section), got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema author added a type this parser does not know
        raise TypeError(f"unsupported config type {tp} at {path}")
    raise ConfigError(f"config key '{path}': expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{path}'.{hint} Allowed keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    obj = cls(**kwargs)
    _check_ranges(obj, prefix)
    return obj


_POSITIVE = {
    "heads.num_heads", "heads.num_layers", "data.num_prompts", "data.max_prompt_tokens", "data.max_new_tokens",
    "data.batch_size", "data.shard_size", "train.micro_batch_size", "train.gradient_accumulation_steps",
    "train.max_seq_len", "train.eval_every", "train.checkpoint_every", "train.log_every", "tree.max_nodes",
    "tree.top_k", "tree.num_calibration_prompts", "tree.calibration_max_new_tokens", "tree.batch_size",
    "verify.num_prompts", "verify.max_new_tokens", "verify.batch_size",
}  # fmt: skip


def _check_ranges(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if path in _POSITIVE and value is not None and value < 1:
            raise ConfigError(f"config key '{path}': must be >= 1, got {value!r}")
    if prefix == "data":
        if not 0.0 <= obj.temperature:
            raise ConfigError(f"config key 'data.temperature': must be >= 0, got {obj.temperature}")
        if not 0.0 < obj.top_p <= 1.0:
            raise ConfigError(f"config key 'data.top_p': must be in (0, 1], got {obj.top_p}")
        if not 0.0 <= obj.eval_fraction < 1.0:
            raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1), got {obj.eval_fraction}")
    if prefix == "train":
        if obj.learning_rate <= 0:
            raise ConfigError(f"config key 'train.learning_rate': must be > 0, got {obj.learning_rate}")
        if not 0.0 <= obj.warmup_ratio < 1.0:
            raise ConfigError(f"config key 'train.warmup_ratio': must be in [0, 1), got {obj.warmup_ratio}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set section.key=value` item; the value is read as YAML (`3`, `true`, `null`, `[a, b]`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. heads.num_heads=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key; use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of the raw config mapping with `section.key=value` overrides applied."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | None = None) -> ToolkitConfig:
    """Validate a raw mapping (plus overrides) into a `ToolkitConfig`."""
    data = apply_overrides(data or {}, overrides)
    if not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping of sections (model:, heads:, ...)")
    return _build(ToolkitConfig, data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ToolkitConfig:
    """Load a YAML config file and apply `--set` overrides; errors name the file, the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}. Pass the path of a YAML config, e.g. configs/smollm2-135m.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of sections (model:, heads:, ...)")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
