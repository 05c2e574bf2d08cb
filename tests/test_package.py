"""The package others build on: the wheel holds snapimg (typed, with its C extension's
types), every part of it, and nothing of the VM rig, the tests or the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "snapimg", "csrc")


def test_every_directory_of_snapimg_is_a_package() -> None:
    """No namespace packages by accident: each directory with modules has __init__.py."""
    dirs = {p.parent for p in (ROOT / "snapimg").rglob("*.py") if "__pycache__" not in p.parts}
    assert [d for d in sorted(dirs) if not (d / "__init__.py").is_file()] == []


@pytest.mark.slow
def test_wheel_holds_snapimg_only(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so")
            )
        else:
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("snapimg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"snapimg"}  # no vmtests, tests or bench
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "snapimg").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, sorted(modules - names)
    assert {"snapimg/py.typed", "snapimg/_datapath.pyi"} <= names
    assert any(n.startswith("snapimg/_datapath.") and n.endswith(".so") for n in names)


def test_the_rig_runs_from_the_checkout() -> None:
    """Not installed, the VM rig is still found from the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmtests", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("scenarios: ")


def test_the_dev_environment_can_build_the_extension() -> None:
    """scripts/sanitize.sh and bench/fuzz.py run `setup.py build_ext` with the environment's
    own setuptools, not pip's isolated build: the dev extra must bring the build backend
    (a virtualenv seeded with an older setuptools rejects pyproject.toml's license)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = set(meta["build-system"]["requires"])
    assert build <= set(meta["project"]["optional-dependencies"]["dev"])
