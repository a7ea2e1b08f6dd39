"""A latency profile: the decoding step's cost by tree size, measured on one machine (`medusa-tune-tree
--profile-latency OUT.json`), saved with what it was measured for, so that a tree can be tuned here for a machine
measured elsewhere (`tree.latency_profile`: train here, serve there). tuning.timing measures one; this module owns
the file's format, so the pipeline can check a profile before any stage runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_toolkit.errors import ToolkitError

PROFILE_KIND = "medusa-toolkit latency profile"


class LatencyProfileError(ToolkitError, ValueError):
    """A latency profile that is missing, malformed, or measured for another model or setup."""


def model_signature(model: Any) -> dict[str, Any]:
    """What a step's cost depends on besides the machine: the base's shape, dtype, attention, compilation, heads."""
    c = model.base.config
    return {
        "model_type": getattr(c, "model_type", None), "hidden_size": getattr(c, "hidden_size", None),
        "num_hidden_layers": getattr(c, "num_hidden_layers", None), "vocab_size": getattr(c, "vocab_size", None),
        "dtype": str(model.dtype).removeprefix("torch."), "compiled": bool(model.compiled),
        "num_heads": model.num_heads, "head_type": model.heads.head_type if model.heads is not None else None,
    }  # fmt: skip


@dataclass
class LatencyProfile:
    """Seconds per decoding step by node budget, measured on `machine` for a model of `signature`."""

    nodes: list[int]
    step_time_s: list[float]
    spread: list[float]
    machine: dict[str, Any]
    signature: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # attention, batch size, prefix length, repeats
    kind: str = PROFILE_KIND

    def latency(self) -> dict[int, float]:
        return dict(zip(self.nodes, self.step_time_s))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LatencyProfileError(
                f"latency profile not found: {path}; measure one with medusa-tune-tree --profile-latency"
            ) from None
        except (OSError, ValueError) as e:
            raise LatencyProfileError(f"{path} is not a latency profile ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise LatencyProfileError(f"{path} is not a latency profile (made by medusa-tune-tree --profile-latency)")
        try:
            profile = cls(**data)
            ok = len(profile.nodes) == len(profile.step_time_s) > 0 and all(t > 0 for t in profile.step_time_s)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise LatencyProfileError(f"{path}: a latency profile needs matching, positive nodes and step_time_s lists")
        return profile

    def check_fits(self, model: Any, source: str) -> None:
        """A profile tunes only the model it was measured for (shape, dtype, compilation, heads)."""
        mine = model_signature(model)
        differ = [
            f"{k}: profile {self.signature.get(k)!r}, here {v!r}" for k, v in mine.items() if self.signature.get(k) != v
        ]
        if differ:
            raise LatencyProfileError(f"{source} was measured for another model or setup ({'; '.join(differ)}); measure it "
                            "with the same base, heads, dtype and model.compile")  # fmt: skip
