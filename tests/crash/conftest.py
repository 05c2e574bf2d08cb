"""Fixtures for the crash-state explorer's tests: the recorder, a reflink file system."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.crash import recording


@pytest.fixture(scope="session")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recording.build_recorder(tmp_path_factory.mktemp("recorder"))


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS with reflinks (root only; skipped with the reason elsewhere)."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is missing (apt-get install xfsprogs)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(320 << 20)
    mnt.mkdir()
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True,
                          text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount XFS here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
