"""Running snapimg and QEMU's tools from backup tests, and the digest rule written out
independently of snapimg (what another tool recomputing it would do)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]
MiB = 1 << 20
PIECE = 4 * MiB


def snapimg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*SNAPIMG, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snapimg {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def snapimg_json(*args: str | Path) -> Any:
    return json.loads(snapimg(*args, "--json").stdout)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> str:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, target], capture_output=True, text=True, timeout=120)
    assert (
        proc.returncode == 0
        and "error" not in proc.stdout.lower()
        and "fail" not in proc.stdout.lower()
    ), proc.stdout + proc.stderr
    return proc.stdout


def make_origin(path: Path, size: int, *writes: str) -> Path:
    """A sparse raw image of ``size`` bytes with qemu-io ``writes`` applied."""
    with path.open("wb") as f:
        f.truncate(size)
    if writes:
        qemu_io(str(path), *writes)
    return path


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pieces_digest_file(path: Path) -> str:
    """The sha256-pieces digest of a raw file, straight from the contract: SHA-256 of
    the concatenated SHA-256 of every 4 MiB piece (the last one shorter)."""
    outer = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(PIECE):
            outer.update(hashlib.sha256(piece).digest())
    return outer.hexdigest()


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def relies_on_holes(path: Path) -> bool:
    """The issue's rule: a file must not be larger than 1.1x the bytes it holds + 1 MiB."""
    return path.stat().st_size > 1.1 * allocated_bytes(path) + MiB


def manifest(directory: Path) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return obj


def wait_for(
    cond: Any, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 120
) -> None:
    """Poll ``cond()`` until true; fail if ``proc`` ends first (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.002)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
