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

from dataclasses import dataclass
from pathlib import Path

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
