"""Real NBD clients for the qsd tests: qemu-io, qemu-img convert/dd, nbdcopy, libnbd."""

from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import nbd

MiB = 1 << 20


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}): {out}"
    return out


def qemu_io(uri: str, *commands: str, expect_fail: bool = False) -> str:
    """Run qemu-io commands on an NBD export; each must succeed unless ``expect_fail``."""
    argv = ["qemu-io", "-f", "raw"]
    if all(c.startswith("read") for c in commands):
        argv.append("-r")  # snapshot exports are read-only
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, uri], capture_output=True, text=True, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    failed = "failed" in out or "error" in out.lower() or proc.returncode != 0
    if expect_fail:
        assert failed, f"qemu-io {commands} unexpectedly succeeded: {out}"
    else:
        assert not failed, f"qemu-io {commands}: {out}"
    return out


def copy_convert(uri: str, dst: Path) -> Path:
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dst))
    return dst


def copy_dd(uri: str, dst: Path, bs: str = "192K") -> Path:
    run("qemu-img", "dd", "-f", "raw", "-O", "raw", f"bs={bs}", f"if={uri}", f"of={dst}")
    return dst


def copy_nbdcopy(uri: str, dst: Path) -> Path:
    dst.touch()
    run("nbdcopy", uri, str(dst))
    return dst


def same_bytes(a: Path, b: Path) -> bool:
    return os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)


def pread(uri: str, offset: int, length: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def read_file(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def make_origin(path: Path, size: int, patterns: list[tuple[int, int, int]]) -> None:
    """A sparse raw image of ``size`` with (byte, offset, length) filled runs."""
    with path.open("wb") as f:
        f.truncate(size)
        for byte, offset, length in patterns:
            f.seek(offset)
            f.write(bytes([byte]) * length)
