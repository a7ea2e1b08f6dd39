"""`make gpu-wheels`: the wheels `make gpu-check` needs on the GPU image, downloaded into .whl/ for carrying there.

The GPU machines (Python 3.12, torch 2.11, triton 3.6, transformers 5.17) reach no network. What they lack:
- transformers with the `cache=` forward argument and `.cache` outputs, which the toolkit uses (5.17 has
  `past_key_values`): the version this checkout's .venv runs (a pure-python wheel, ~12 MB);
- DeepSpeed for the training smoke, built here as a pure-python wheel (DS_BUILD_OPS=0: its ops JIT-build on use;
  the smoke uses torch's AdamW and needs none), plus the dependencies the image lacks (pydantic and its core,
  hjson, ...).
Versions are this .venv's, so the GPU runs what the CPU tests ran. .whl/ is listed in .git/info/exclude (never
committed) and stays under the 64 MiB a device call carries. On the GPU machine, before `make gpu-check`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site

    .venv/bin/python benchmarks/gpu_wheels.py [--dest .whl]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Wheels downloaded for CPython 3.12 on x86-64 Linux (the GPU image), at this .venv's versions.
DOWNLOAD = ["transformers", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
DOWNLOAD += ["typing-extensions"]  # pydantic needs a recent one; backward compatible for everything else
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_MIB = 64  # what one device call carries, working tree included


def exclude(dest: Path) -> None:
    """List dest in .git/info/exclude so that it is never committed (it still travels when `carry` names it)."""
    path = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = (REPO / path).resolve()
    line = f"/{dest.relative_to(REPO)}/"
    text = path.read_text() if path.exists() else ""
    if line not in text.splitlines():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = p.parse_args(argv)
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if dest.is_relative_to(REPO):
        exclude(dest)
    pins = [f"{name}=={version(name)}" for name in DOWNLOAD]
    pip = [sys.executable, "-m", "pip"]
    platforms = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
    cmd = pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    subprocess.run(cmd + ["--implementation", "cp", *platforms, "-d", str(dest), *pins], check=True)
    env = dict(os.environ, DS_BUILD_OPS="0")
    ds = f"deepspeed=={version('deepspeed')}"
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), ds], env=env, check=True)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    print(f"{size:.1f} MiB in {dest} (a device call carries {LIMIT_MIB} MiB with the working tree)")
    return 0 if size < LIMIT_MIB - 8 else 1


if __name__ == "__main__":
    sys.exit(main())
