"""Our top-level folders never shadow an installed package, from any working directory and any install form.

transformers (5.25+) imports Hugging Face's `kernels` package; our repository has a top-level `kernels/` folder too.
Python puts the working directory (or a script's folder) first on sys.path, so every check runs in a subprocess whose
cwd is the repository root, the way a user's `python -c`, `python -m`, REPL or launcher starts there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import medusa_toolkit
from medusa_toolkit.kernels import flash_decode

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Our top-level folders that hold Python files, and how each must behave when the repository root is on sys.path:
# the subpackage folders and the non-package folders are namespace folders (an installed package of the same name
# wins); toolkit/ is medusa_toolkit's own root package (regular), so no installed distribution may use its name.
NAMESPACE_FOLDERS = ("kernels", "train", "verify", "export", "tests", "benchmarks", "configs", "docs")
REGULAR_FOLDERS = ("toolkit",)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return env | extra


def _run(args: list[str], cwd: Path = REPO, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _hf_kernels_dir() -> Path:
    dist = importlib.metadata.distribution("kernels")
    return Path(dist.locate_file("kernels")).resolve()


WHERE = (
    "import sys, kernels, transformers.modeling_utils, medusa_toolkit, medusa_toolkit.kernels.flash_decode as fd; "
    "from medusa_toolkit import MedusaModel; print(kernels.__file__); print(medusa_toolkit.__file__); print(fd.__file__)"
)


@pytest.mark.parametrize("cwd", ["repo root", "tests"])
def test_python_c_resolves_hugging_face_kernels_and_ours(cwd):
    where = {"repo root": REPO, "tests": REPO / "tests"}[cwd]
    proc = _run([sys.executable, "-c", WHERE], cwd=where)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_kernels, ours, flash = (Path(line).resolve() for line in proc.stdout.strip().splitlines()[-3:])
    assert hf_kernels.parent == _hf_kernels_dir() and not hf_kernels.is_relative_to(REPO / "kernels")
    # The same medusa_toolkit this test process runs (with `make test`'s editable install: links to the checkout).
    assert ours == Path(medusa_toolkit.__file__).resolve()
    assert flash == Path(flash_decode.__file__).resolve() and flash.name == "flash_decode.py"


def test_python_m_from_the_repo_root():
    """(Every CLI's --help also runs from the repo root in tests/test_trust.py, as `python -c`.)"""
    proc = _run([sys.executable, "-m", "medusa_toolkit.train.cli", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_python_m_pytest_from_the_repo_root():
    """`python -m pytest` puts the repo root on sys.path: collecting a test module that imports transformers works."""
    proc = _run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/model/test_tree.py"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_tree.py::" in proc.stdout


@pytest.mark.parametrize(
    "launcher",
    [
        # README "Multi-GPU and multi-node", with one process (CPU, gloo) and --help.
        ["torchrun", "--nproc_per_node", "1", "-m", "medusa_toolkit.train.cli", "--help"],
        ["deepspeed", "--num_gpus", "1", "--module", "medusa_toolkit.train.cli", "--help"],
    ],
    ids=["torchrun", "deepspeed"],
)
def test_readme_launchers_from_the_repo_root(launcher):
    exe = BIN / launcher[0]  # both come with our dependencies (torch, deepspeed)
    proc = _run([str(exe), *launcher[1:]], MASTER_PORT="29531")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "usage: medusa-train" in proc.stdout


def test_an_installed_package_wins_over_every_namespace_folder(tmp_path):
    """A distribution that ships a top-level package named like one of our folders must get its own code, also when
    the repository root is first on sys.path (as Hugging Face's `kernels` does for transformers)."""
    site = tmp_path / "site"
    for name in NAMESPACE_FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = f"import importlib; print([importlib.import_module(n).WHO for n in {NAMESPACE_FOLDERS!r}])"
    proc = _run([sys.executable, "-c", code], PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str([f"installed {n}" for n in NAMESPACE_FOLDERS])
    for name in NAMESPACE_FOLDERS:
        assert not (REPO / name / "__init__.py").exists(), f"{name}/__init__.py would shadow an installed {name!r}"


def test_no_installed_distribution_uses_a_name_our_regular_folders_take():
    """toolkit/ is a regular package (medusa_toolkit's root): with the repo root on sys.path it would shadow an
    installed top-level `toolkit`. None may exist; `make test-latest` shows it the day a dependency ships one."""
    taken: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] in (None, "medusa-toolkit"):
            continue
        tops = set((dist.read_text("top_level.txt") or "").split())
        tops |= {str(f).split("/")[0].removesuffix(".py") for f in dist.files or [] if not str(f).startswith("..")}
        for name in set(REGULAR_FOLDERS) & tops:
            taken.setdefault(name, []).append(dist.metadata["Name"])
    assert not taken, f"installed distributions ship top-level modules named like our regular folders: {taken}"


def test_plain_editable_install_fails_with_the_fix_named(tmp_path):
    """setuptools' default editable finder cannot map a namespace folder under a regular package: the import says how
    to reinstall, instead of failing later at the first kernel use. (Simulated: medusa_toolkit without kernels/.)"""
    fake = tmp_path / "medusa_toolkit"
    fake.symlink_to(REPO / "toolkit", target_is_directory=True)
    proc = _run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import medusa_toolkit",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "editable_mode=strict" in proc.stderr and "kernels/" in proc.stderr


def _source_copy(dest: Path) -> Path:
    """What a wheel is built from: pyproject's package folders, pyproject.toml and README.md (no build/, no venv)."""
    for folder in ("toolkit", "train", "verify", "export", "kernels"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        cwd=src,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("medusa_toolkit-*.whl")
    return built


def test_wheel_holds_every_kernel_module_and_nothing_else_at_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"medusa_toolkit", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for folder, package in (("kernels", "kernels"), ("train", "train"), ("verify", "verify"), ("export", "export")):
        for module in (REPO / folder).glob("*.py"):
            assert f"medusa_toolkit/{package}/{module.name}" in names, f"{folder}/{module.name} missing from the wheel"
    for module in (REPO / "toolkit").rglob("*.py"):
        assert f"medusa_toolkit/{module.relative_to(REPO / 'toolkit').as_posix()}" in names
    assert "medusa_toolkit/prompt_sets/eval.jsonl" in names


def test_wheel_install_from_the_repo_root(wheel, tmp_path):
    """Installed from the wheel (not editable), run from the repo root: Hugging Face's kernels and our package."""
    target = tmp_path / "site"
    proc = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([sys.executable, "-c", WHERE], PYTHONPATH=str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_kernels, ours, flash = (Path(line).resolve() for line in proc.stdout.strip().splitlines()[-3:])
    assert hf_kernels.parent == _hf_kernels_dir()
    assert ours == target / "medusa_toolkit" / "__init__.py"
    assert flash == target / "medusa_toolkit" / "kernels" / "flash_decode.py"
