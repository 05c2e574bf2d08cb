"""Fixtures shared by several test packages."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.serving import Serve


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Factory: serve(images, *extra_args) -> Serve; every server is stopped at teardown."""
    started: list[Serve] = []

    def start(images: list[str], *extra: str) -> Serve:
        s = Serve(tmp_path, images, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        s.kill()


@pytest.fixture
def loop_xfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 MiB XFS with reflink, loop-mounted (root only; skipped with the reason where
    it cannot be made or mounted); thawed and unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop XFS needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (Debian package xfsprogs)")
    backing, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with backing.open("wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(backing), str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop XFS here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: tmpfs("2M") mounts a tmpfs of that size (root only; skipped otherwise)
    and returns its directory; every one is unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       check=True)  # fmt: skip
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
