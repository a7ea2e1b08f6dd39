"""Content hashes of the files and folders the toolkit reads, so that "cached" and "verified" name exact bytes.

`file_digest` is the sha256 of a file's bytes. Hashing a multi-GB base model on every run would cost minutes, so a
digest is remembered per (path, size, mtime_ns, inode) in `$MEDUSA_TOOLKIT_CACHE/digests.json`: any write to the
file changes its mtime or size and so forces a re-hash. The memo is an optimisation only; deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from medusa_toolkit.cache import cache_dir

CHUNK = 1 << 20
_MEMO: dict[str, str] | None = None


def _memo_path() -> Path:
    return cache_dir() / "digests.json"


def _memo() -> dict[str, str]:
    global _MEMO
    if _MEMO is None:
        try:
            _MEMO = json.loads(_memo_path().read_text())
        except (OSError, ValueError):
            _MEMO = {}
    return _MEMO


def _save_memo() -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(_memo(), f)
        os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written memo
    except OSError:
        pass  # a read-only cache only costs re-hashing


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's content, memoised by its stat."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo = _memo()
    if key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        memo[key] = h.hexdigest()
        if st.st_size >= CHUNK:  # small files re-hash faster than the memo is written
            _save_memo()
    return memo[key]


def folder_files(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder` (names in `exclude` at the top level left out)."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = file_digest(p)
    return out


def digest_of(obj: object) -> str:
    """sha256 of a JSON-serialisable value (sorted keys): a stable hash of settings and file listings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def path_digest(path: str | Path) -> str:
    """Content hash of a file, or of a folder (its files' names and contents)."""
    path = Path(path)
    return file_digest(path) if path.is_file() else digest_of(folder_files(path))
