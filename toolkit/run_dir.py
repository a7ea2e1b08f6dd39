"""The run directory's layout, named once: every path a stage, a command or the summary reads or writes in a run.

```
<output_dir>/
  config.resolved.yaml     the config after overrides, as run
  data/                    the data artefact (medusa_toolkit.data_artefact)
  checkpoints/             DeepSpeed checkpoints (+ data order and RNG state, for --resume)
  teacher_cache/           with train.teacher_cache: disk, the base's hidden states per sequence
  heads/                   the train stage's artefact
  tree/tree.json           the tree stage's artefact (+ PNG plots)
  verify/report.json       the verify stage's artefact (+ junit.xml)
  export/medusa, export/vllm   the export stage's packages
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from medusa_toolkit.errors import ToolkitError

TREE_FILE = "tree.json"
REPORT_FILE = "report.json"
JUNIT_FILE = "junit.xml"
# The artefact folder of each stage, where it differs from the stage's name.
ARTEFACT_FOLDERS = {"train": "heads"}


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (nothing is created by naming it)."""

    root: Path

    def __init__(self, root: str | Path | RunDir):
        object.__setattr__(self, "root", root.root if isinstance(root, RunDir) else Path(root))

    def artefact(self, stage: str) -> Path:
        """The folder a stage's artefact lives in (`heads/` for the train stage)."""
        return self.root / ARTEFACT_FOLDERS.get(stage, stage)

    @property
    def config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def data(self) -> Path:
        return self.artefact("data")

    @property
    def data_partial(self) -> Path:
        """Finished data shards of an unfinished data stage, by input digest (survives an interrupted run)."""
        return self.root / ".data.partial"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher_cache"

    @property
    def heads(self) -> Path:
        return self.artefact("train")

    @property
    def tree(self) -> Path:
        return self.artefact("tree")

    @property
    def tree_file(self) -> Path:
        return self.tree / TREE_FILE

    @property
    def verify(self) -> Path:
        return self.artefact("verify")

    @property
    def report(self) -> Path:
        return self.verify / REPORT_FILE

    @property
    def export(self) -> Path:
        return self.artefact("export")


class RunLockError(ToolkitError, RuntimeError):
    """Another command is writing into this run directory; the message names it."""


class RunLock:
    """One writer per run directory: an advisory lock on `<run>/.lock` (fcntl.flock), held while a command writes.

    The kernel drops the lock when its holder exits, however it dies, so a killed run never blocks the next one; the
    file only records who holds it (pid, host, command, start) for the message a second writer gets. `token` names
    this run's temp folders, so no two processes ever share one.
    """

    def __init__(self, root: str | Path | RunDir, command: str):
        self.path = RunDir(root).root / ".lock"
        self.command = command
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish (or stop it), or pass another "
                "output directory (--output-dir)"
            ) from None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"{self.command} (pid {os.getpid()} on {socket.gethostname()}, since {started})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def locked(run: RunDir | None, command: str):
    """The run lock around a command that writes into `run` (a no-op context without a run)."""
    return RunLock(run, command) if run is not None else contextlib.nullcontext()
