"""Digest of a whole image, equal to ``sha256sum`` of its raw bytes, skipping holes.

Holes and extents known to read as zeroes are hashed from a zero buffer without being
read; data extents are read ahead by a helper thread while the main thread hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from snapimg.errors import UsageError
from snapimg.inspect.readahead import CHUNK, chunked, read_ahead
from snapimg.inspect.source import Source

_ZEROES = memoryview(bytes(CHUNK))


def check_algo(algo: str) -> None:
    if algo not in hashlib.algorithms_available or algo.startswith("shake_"):
        choices = ", ".join(sorted(a for a in hashlib.algorithms_guaranteed if "shake" not in a))
        raise UsageError(f"unknown digest {algo!r}: choose one of {choices}")


def _plan(src: Source) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, read?) pieces of at most CHUNK bytes over the whole source."""
    for off, ext in src.extents():
        for o, n in chunked(off, ext.length):
            yield o, n, not (ext.hole or ext.zero)


def checksum(
    src: Source, algo: str = "sha256", progress: Callable[[int], None] | None = None
) -> str:
    """Hex digest of all ``src.size`` bytes; ``progress(done_bytes)`` after each piece."""
    check_algo(algo)
    h = hashlib.new(algo)
    plan = list(_plan(src))
    data = read_ahead(src, ((o, n) for o, n, read in plan if read))
    done = 0
    try:
        for _, n, read in plan:
            h.update(next(data) if read else _ZEROES[:n])
            done += n
            if progress is not None:
                progress(done)
    finally:
        data.close()
    return h.hexdigest()
