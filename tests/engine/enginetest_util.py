"""Helpers shared by the engine tests (imported by name: tests/engine is on sys.path)."""

from __future__ import annotations

import random
from pathlib import Path

BS = 65536


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """A raw image of ``size`` bytes with reproducible pseudo-random content."""
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def store_bytes(store: Path) -> dict[str, bytes]:
    """Every store file's content except the lock file (to show nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name != "store.lock"}


def acknowledged(lines: list[str], content: bytearray, snaps: dict[str, bytes]) -> list[str]:
    """Apply the operations kill_child.py reported done (``B <op>`` ... ``E``) to
    ``content`` and ``snaps``; returns the operation in flight when it died ([]: none)."""
    pending: list[str] = []
    for line in lines:
        if line.startswith("B "):
            pending = line[2:].split()
            continue
        op, pending = pending, []
        if op[0] == "write":
            off, length, val = map(int, op[1:])
            content[off : off + length] = bytes([val]) * length
        elif op[0] == "create":
            snaps[op[1]] = bytes(content)
        elif op[0] == "drop":
            del snaps[op[1]]
    return pending
