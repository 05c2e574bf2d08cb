"""A real qemu-guest-agent on the host (its unix-listen transport), and a silent socket.

The agent is Debian's ``qemu-ga``, fetched with ``apt-get download`` and unpacked (never
installed), like the Linux test guest's packages.  On the host it must never freeze or thaw
anything: every command except a few harmless ones is blocked with ``-b``, so only the
protocol (sync, replies, error classes) is exercised here; freezing is proven in the guest
(tests/vm/test_quiesce.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.listening import wait_listening
from vmtests import config

# what the host agent may run; everything else it lists is blocked
ALLOWED = {
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-fsfreeze-status",
}


@pytest.fixture(scope="session")
def qemu_ga() -> Path:
    """Debian's qemu-ga binary, unpacked into the cache folder."""
    cache = config.load().cache_dir / "host-qemu-ga"
    binary = cache / "root" / "usr" / "sbin" / "qemu-ga"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    for deb in cache.glob("*.deb"):
        deb.unlink()
    fetch = subprocess.run(
        ["apt-get", "download", "qemu-guest-agent"],
        cwd=cache,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if fetch.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        fetch = subprocess.run(
            ["apt-get", "download", "qemu-guest-agent"],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert fetch.returncode == 0, f"apt-get download qemu-guest-agent: {fetch.stderr}"
    [deb] = cache.glob("qemu-guest-agent_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "root")], check=True, timeout=120)
    return binary


def _blocked(binary: Path) -> list[str]:
    listing = subprocess.run(
        [str(binary), "-b", "help"], capture_output=True, text=True, timeout=30
    )
    names = set((listing.stdout + listing.stderr).split())
    commands = {name for name in names if name.startswith("guest-")}
    assert "guest-fsfreeze-freeze" in commands, f"qemu-ga -b help listed: {sorted(commands)}"
    return sorted(commands - ALLOWED)


@pytest.fixture
def host_agent(qemu_ga: Path, tmp_path: Path) -> Iterator[Path]:
    """The unix socket of a qemu-ga listening on the host (freeze and thaw blocked)."""
    sock = tmp_path / "qga.sock"
    state = tmp_path / "qga-state"
    state.mkdir()
    proc = subprocess.Popen(
        [
            str(qemu_ga),
            "-m",
            "unix-listen",
            "-p",
            str(sock),
            "-t",
            str(state),
            "-f",
            str(state / "qemu-ga.pid"),
            "-b",
            ",".join(_blocked(qemu_ga)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "qemu-ga.log").open("wb"),
        start_new_session=True,
    )
    try:
        try:
            wait_listening(sock, proc, "qemu-ga")
        except AssertionError as err:
            raise AssertionError(f"{err}: {(tmp_path / 'qemu-ga.log').read_text()}") from None
        yield sock
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def silent_agent(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts connections and never answers (a hung guest agent)."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener is closed at teardown
            while True:
                held.append(listener.accept()[0])  # read nothing, answer nothing

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)
        for conn in held:
            conn.close()
