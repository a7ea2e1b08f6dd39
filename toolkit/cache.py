"""The toolkit's per-machine cache: `MEDUSA_TOOLKIT_CACHE` (default `~/.cache/medusa-toolkit`).

It holds what is expensive to redo and safe to lose: builtin models converted from GGUF (`models/`) and the memo of
file digests (`digests.json`). Deleting it only costs the time to rebuild what is in it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the toolkit's cache (`MEDUSA_TOOLKIT_CACHE`, default `~/.cache/medusa-toolkit`)."""
    return Path(os.environ.get("MEDUSA_TOOLKIT_CACHE", Path.home() / ".cache" / "medusa-toolkit")).expanduser()
