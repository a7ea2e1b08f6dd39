"""The house rules of the source tree: imports run one way, from the jobs down to the leaves.

  root leaves (errors, config, digest, prompts, ...)  <  model/  <  decoding/  <  pipeline/  <  tuning/
  <  train/, verify/, export/ (the jobs; none imports another), testing/ (test helpers, beside the jobs: it imports
  no job, and nothing imports it)        kernels/ imports nothing of ours.

A module may import its own room and the rooms below it, never one above; `medusa_toolkit/__init__.py` (the public
API) is the one exception. toolkit/ names train/verify/export only as "module:function" strings, and only in
`medusa_toolkit.entry_points`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"toolkit": "medusa_toolkit", "train": "medusa_toolkit.train", "verify": "medusa_toolkit.verify",
           "export": "medusa_toolkit.export", "kernels": "medusa_toolkit.kernels"}  # fmt: skip
RANK = {"leaf": 0, "model": 1, "decoding": 2, "pipeline": 3, "tuning": 4,
        "train": 5, "verify": 5, "export": 5, "testing": 5}  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def room(module: str) -> str:
    """medusa_toolkit.model.heads -> model; medusa_toolkit.digest -> leaf; medusa_toolkit.train.data.stage -> train."""
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    return parts[1] if parts[1] in RANK or parts[1] == "kernels" else "leaf"


def imports_of(path: Path, module: str) -> set[str]:
    """Every medusa_toolkit module a file imports, at top level or inside functions (relative imports resolved)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medusa_toolkit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("medusa_toolkit"):
                submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
                found |= submodules or {base}  # `from pkg import module` uses the module, not the package
    return found


MODULES = modules()


def test_every_folder_is_mapped():
    assert "medusa_toolkit.digest" in MODULES and "medusa_toolkit.kernels.flash_decode" in MODULES
    assert "medusa_toolkit.train.data.stage" in MODULES and "medusa_toolkit.tuning.stage" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    mine = room(module)
    if mine == "facade":
        return  # medusa_toolkit/__init__.py re-exports the public API from the rooms
    for target in imports_of(MODULES[module], module):
        theirs = room(target)
        if mine == "kernels":
            assert theirs == "kernels", f"{module} imports {target}: kernels/ imports nothing else of ours"
            continue
        if theirs == "kernels":
            continue  # any room may use the kernels
        assert theirs != "facade", f"{module} imports the package facade (medusa_toolkit); import the module itself"
        assert RANK[theirs] < RANK[mine] or theirs == mine, f"{module} ({mine}) imports {target} ({theirs}): upward"


TARGET = re.compile(r"medusa_toolkit\.(train|verify|export)(\.\w+)*(:\w+)?")


def test_only_entry_points_names_train_verify_export():
    named = []
    for module, path in MODULES.items():
        if room(module) in ("train", "verify", "export", "kernels") or module == "medusa_toolkit.entry_points":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET.fullmatch(node.value):
                named.append(f"{module}: {node.value!r}")
    assert not named, named
