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
