"""medusa_toolkit.verify: the losslessness verifier (`medusa-verify`, the `verify` stage) and the sampling check.

Nothing heavy is imported here; `verify_heads` and `run_verify` load on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"verify_heads": "verifier", "run_verify": "verifier", "VerifyReport": "report", "validate_report": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
