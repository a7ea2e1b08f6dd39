"""The toolkit's typed configuration: one YAML file, one pydantic model per section.

Every stage reads only its own section (plus `model`/`heads`). Values are validated when the config is loaded, so a
typo or a bad value fails before any model is loaded, with the key path, the allowed values and a "did you mean".
pydantic does the typing, coercion and range checks; this module only words its errors for people and applies
`--set section.key=value` overrides. Adding a knob is adding a field with a default and a comment.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from medusa_toolkit.errors import ToolkitError

DType = Literal["float32", "bfloat16", "float16"]
AttnImpl = Literal["sdpa", "eager", "medusa_flash_decoding"]
StageName = Literal["data", "train", "tree", "verify", "export"]
ALL_STAGES: tuple[str, ...] = ("data", "train", "tree", "verify", "export")


class ConfigError(ToolkitError, ValueError):
    """A config value or key is wrong; the message names the key path and the fix."""


def _number(value: Any) -> Any:
    """Floats from ints, floats and numeric strings (YAML 1.1 reads `1e-3` as a string); never from booleans."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # pydantic reports it
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Float = Annotated[float, BeforeValidator(_number)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # Hub id, local HF folder, a .gguf file, or the builtin alias `smollm2-135m-instruct` (offline).
    name_or_path: str = "smollm2-135m-instruct"
    dtype: DType = "float32"
    # None: CUDA when available, else CPU.
    device: str | None = None
    # Attention used by Medusa decoding (verification and plain decoding steps).
    attn_implementation: AttnImpl = "sdpa"


class HeadsConfig(Section):
    num_heads: PositiveInt = 4
    num_layers: PositiveInt = 1
    head_type: Literal["per_head_lm_head", "shared_lm_head"] = "per_head_lm_head"
    # Start from existing heads (folder or Hub id) instead of fresh ones.
    init_from: str | None = None


class DataConfig(Section):
    # Where prompts come from: chitchat (offline package), file (jsonl/json/parquet/csv/txt), hf (datasets name),
    # builtin (8 fixed smoke-test prompts), none (unconditional samples from BOS).
    source: Literal["chitchat", "file", "hf", "builtin", "none"] = "chitchat"
    # File path (source=file) or dataset name (source=hf).
    path: str | None = None
    field: str = "prompt"
    split: str = "train"
    num_prompts: PositiveInt = 256
    use_chat_template: StrictBool = True
    system_prompt: str | None = None
    max_prompt_tokens: PositiveInt = 256
    max_new_tokens: PositiveInt = 128
    temperature: Annotated[Float, Field(ge=0.0)] = 0.0
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0
    batch_size: PositiveInt = 8
    # Train on the prompt tokens too (the response is always trained on).
    train_on_prompt: StrictBool = False
    # Fraction of sequences held out for evaluation.
    eval_fraction: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.05
    shard_size: PositiveInt = 64
    seed: StrictInt = 0


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    # A DeepSpeed JSON file; when set it is used as the base and the fields above fill only what it leaves out.
    config_file: str | None = None


class TrainConfig(Section):
    epochs: Annotated[Float, Field(gt=0.0)] = 1.0
    max_steps: PositiveInt | None = None
    micro_batch_size: PositiveInt = 8
    gradient_accumulation_steps: PositiveInt = 1
    max_seq_len: PositiveInt = 512
    learning_rate: Annotated[Float, Field(gt=0.0)] = 1e-3
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0
    warmup_ratio: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.05
    min_lr_ratio: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0
    grad_clip: Annotated[Float, Field(ge=0.0)] = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss: Literal["ce", "kl"] = "ce"
    kl_temperature: Annotated[Float, Field(gt=0.0)] = 1.0
    kl_top_k: PositiveInt | None = None
    # Per-head loss weight decay**k (Medusa-2).
    head_weight_decay: Annotated[Float, Field(gt=0.0)] = 0.8
    # Keep the frozen base's last hidden states per sequence after their first use, so later epochs and evals skip the
    # base forward: false (off), memory (this process's RAM), or disk (memory-mapped files under RUN_DIR/teacher_cache,
    # written once, reused across epochs and --resume, rebuilt when the train stage's inputs change). The kl teacher
    # logits are base_logits(hidden), so nothing else needs caching. `true` is read as `memory`.
    teacher_cache: Annotated[
        Literal[False, "memory", "disk"], BeforeValidator(lambda v: "memory" if v is True else v)
    ] = False
    eval_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 100
    log_every: PositiveInt = 10
    seed: StrictInt = 0
    # Continue from the latest checkpoint in RUN_DIR/checkpoints (`medusa-train --resume` sets it). Not a stage input:
    # a resumed run ends with the same heads as an uninterrupted one.
    resume: StrictBool = False
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


class TreeConfig(Section):
    # A preset name (chain-N, mc_sim_7b_63), a tree.json path, or `auto` (tune from measured acceptance).
    tree: str = "auto"
    max_nodes: PositiveInt = 64
    max_depth: PositiveInt | None = None
    top_k: PositiveInt = 10
    # speed: max predicted tokens/s from measured step latency; acceptance: max expected accepted length.
    objective: Literal["speed", "acceptance"] = "speed"
    # Prompts whose greedy text calibrates the acceptance tables and validates the choice, when the data stage left
    # no held-out rows: chitchat (its held-out split), builtin, or a prompts file (with `prompt_field`).
    prompts: str = "chitchat"
    prompt_field: str = "prompt"
    # Held-out prompts (or data-stage eval rows) whose greedy text calibrates the acceptance tables.
    num_calibration_prompts: PositiveInt = 32
    calibration_max_new_tokens: PositiveInt = 64
    # Further held-out prompts decoded to check the prediction (and compare presets); 0 skips the check.
    num_validation_prompts: Annotated[StrictInt, Field(ge=0)] = 8
    # Batch size and KV-cache prefix length at which one verification step is timed.
    batch_size: PositiveInt = 1
    prefix_length: PositiveInt = 256
    # Timed repeats per node budget (the median is used).
    latency_repeats: PositiveInt = 5


class VerifyConfig(Section):
    # Prompts: builtin (8 fixed prompts, always installed), chitchat (its held-out split), or a file
    # (.jsonl/.json/.parquet/.csv with `prompt_field`, .txt one per line).
    prompts: str = "builtin"
    prompt_field: str = "prompt"
    # Prompts checked; null: every prompt of a file, DEFAULT_NUM_PROMPTS of a named set (chitchat, builtin).
    num_prompts: PositiveInt | None = None
    # Tokens generated per prompt by both the reference and Medusa.
    max_new_tokens: PositiveInt = 64
    # None: model.dtype.
    dtype: DType | None = None
    # Attention of the Medusa side (the reference always uses sdpa).
    attn_implementation: AttnImpl = "medusa_flash_decoding"
    # Prompts Medusa decodes together (batched decoding, per-row KV lengths); references always run one at a time.
    batch_size: PositiveInt = 1
    # Count numerical ties as failures too.
    strict: StrictBool = False
    # Logit gap under which a divergence is a tie; None: per-dtype default (verify/verifier.py TIE_TOLERANCE).
    tie_tolerance: Annotated[Float, Field(ge=0.0)] | None = None
    # Fail (exit 3) when the mean accepted tokens per step is below this; None: no acceptance gate.
    min_accept_length: Annotated[Float, Field(ge=0.0)] | None = None
    # Tree to verify (preset or tree.json); None: the tree stage's tree.json, else tree.tree, else a chain.
    tree: str | None = None


class ExportConfig(Section):
    # Packages to write under run_dir/export/: medusa (TGI / TensorRT-LLM) and vllm.
    formats: Annotated[list[Literal["medusa", "vllm"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["medusa", "vllm"]
    )
    # ORG/NAME to push the medusa package to (the vllm package goes to ORG/NAME-vllm); null: no push.
    push_to_hub: str | None = None
    # Hub id of the base written into the packages (engines load the base by it); null: model.name_or_path when it
    # is a Hub id or a builtin alias. Required to push heads of a base given as a local folder or file.
    base_model_id: str | None = None
    private: StrictBool = False
    # Branch to push to (created if missing); null: main.
    revision: str | None = None
    # Open a pull request instead of committing to the branch.
    create_pr: StrictBool = False
    commit_message: str | None = None
    # Push heads whose verification failed or is missing (refused by default).
    allow_unverified: StrictBool = False
    # Weight dtype in the packages; null keeps the heads' dtype.
    dtype: DType | None = None
    # Save the base tokenizer into the medusa package (TGI reads the tokenizer from --model-id).
    include_tokenizer: StrictBool = True


class LoggingConfig(Section):
    wandb_mode: Literal["online", "offline", "disabled", "auto"] = "auto"
    wandb_project: str = "medusa-toolkit"
    run_name: str | None = None
    progress: StrictBool = True


class ToolkitConfig(Section):
    output_dir: str = "runs/default"
    stages: Annotated[list[StageName], Field(min_length=1)] = Field(default_factory=lambda: list(ALL_STAGES))
    model: ModelConfig = Field(default_factory=ModelConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tree: TreeConfig = Field(default_factory=TreeConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_keys(model: type[BaseModel] = ToolkitConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the schema as `section.key` (the README's config reference must name each one)."""
    keys = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += config_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


# ----------------------------------------------------------------------------------------------------------------------
# Errors worded for people


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that holds the key at `loc` (None below a list or a leaf)."""
    model: type[BaseModel] = ToolkitConfig
    for part in loc[:-1]:
        info = model.model_fields.get(str(part)) if isinstance(part, str) else None
        sub = info.annotation if info else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: dict) -> str:
    """One pydantic error as a sentence naming the key, the value and the fix."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-before",))))
    path, kind, value, ctx = _path(loc), err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        section = _section_at(loc)
        names = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        prefix = _path(loc[:-1])
        hint = f" Did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
        where = f"section '{prefix}'" if prefix else "the top level"
        return f"unknown config key '{path}'.{hint} Allowed keys in {where}: {', '.join(names)}"
    if kind == "literal_error":
        allowed = ctx.get("expected", "")
        hint = ""
        if isinstance(value, str):
            options = [a.strip().strip("'") for a in allowed.replace(" or ", ", ").split(",")]
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"config key '{path}': {value!r} is not allowed; allowed values: {allowed.replace(' or ', ', ')}{hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"config key '{path}': expected a mapping (section), got {value!r}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"config key '{path}': must be {bounds[kind]} {limit}, got {value!r}"
    if kind == "too_short":
        return f"config key '{path}': must not be empty (name at least one), got {value!r}"
    expected = {"int": "int", "float": "float (e.g. 1e-3)", "bool": "true or false", "string": "a string"}
    for word, what in expected.items():
        if kind.startswith(word) or kind.startswith(f"{word}_"):
            return f"config key '{path}': expected {what}, got {value!r} ({type(value).__name__})"
    return f"config key '{path}': {err['msg']}, got {value!r}"


def _validate(data: dict[str, Any]) -> ToolkitConfig:
    try:
        return ToolkitConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # A union (e.g. `int | None`) reports one error per option; the first names the real expectation.
        seen, lines = set(), []
        for err in errors:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            if loc in seen:
                continue
            seen.add(loc)
            lines.append(_explain(err))
        raise ConfigError("; ".join(lines)) from None


# ----------------------------------------------------------------------------------------------------------------------
# Loading and overrides


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


def set_key(data: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """Set `section.key` in a raw config mapping (in place), creating sections as needed."""
    keys = key.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key!r}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | None, values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of the raw config mapping with `section.key=value` overrides, then `values` ({dotted key: value}), set."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        set_key(data, ".".join(keys), value, f"override {item!r}")
    for key, value in (values or {}).items():
        set_key(data, key, value)
    return data


def config_from_dict(
    data: dict[str, Any] | None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> ToolkitConfig:
    """Validate a raw mapping (plus `--set` overrides and command-line `values`) into a `ToolkitConfig`."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping of sections (model:, heads:, ...)")
    return _validate(apply_overrides(data or {}, overrides, values))


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> ToolkitConfig:
    """Load a YAML config file (None: the defaults), apply `--set` overrides and command-line `values`.

    Errors name the file, the key and the fix.
    """
    if path is None:
        return config_from_dict({}, overrides, values)
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
        return config_from_dict(data, overrides, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
