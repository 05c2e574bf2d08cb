"""Fixtures for backup tests: a real ``snapimg serve`` and a qemu-storage-daemon export."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.listening import wait_listening

TOOLS = ("qemu-io", "qemu-img", "qemu-storage-daemon")


@pytest.fixture(autouse=True, scope="session")
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools (run scripts/install.sh): {', '.join(missing)}")


@pytest.fixture
def qsd_export(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Factory: export a raw file read-only with qemu-storage-daemon; returns its NBD URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: Path) -> str:
        sock = tmp_path / f"qsd{len(procs)}.sock"
        proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=f,filename={image},read-only=on",
                "--nbd-server",
                f"addr.type=unix,addr.path={sock}",
                "--export",
                "type=nbd,id=e,node-name=f,name=img",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        wait_listening(sock, proc, "qemu-storage-daemon")
        return f"nbd+unix:///img?socket={sock}"

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
