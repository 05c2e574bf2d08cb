"""Which clusters a qsd snapshot has preserved, read from QEMU's NBD export.

Snapshot exports are created with ``allocation-depth``: the ``qemu:allocation-depth``
meta context reports depth 1 for clusters held by the snapshot's own qcow2 target, i.e.
the clusters copied there because the origin was written after the snapshot.  That is
both the preserved data and the changed ranges of an incremental backup.  libnbd is
synchronous: call :func:`copied_ranges` in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable

import nbd

ALLOCATION_DEPTH = "qemu:allocation-depth"


def copied_ranges(uri: str) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges allocated in the export's top image."""
    h = nbd.NBD()
    h.add_meta_context(ALLOCATION_DEPTH)
    h.connect_uri(uri)
    try:
        if not h.can_meta_context(ALLOCATION_DEPTH):
            raise RuntimeError(f"{uri} does not offer {ALLOCATION_DEPTH}")
        size = h.get_size()
        ranges: list[tuple[int, int]] = []
        offset = 0
        while offset < size:
            found: list[int] = []
            h.block_status(min(size - offset, 1 << 30), offset, _collector(found))
            if not found:
                raise RuntimeError(f"{uri}: no block status at offset {offset}")
            for i in range(0, len(found), 2):
                length, depth = found[i], found[i + 1]
                if depth == 1:
                    if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                    else:
                        ranges.append((offset, length))
                offset += length
            offset = min(offset, size)
        return ranges
    finally:
        h.shutdown()


def _collector(found: list[int]) -> Callable[[str, int, list[int], object], int]:
    def collect(ctx: str, start: int, entries: list[int], err: object) -> int:
        if ctx == ALLOCATION_DEPTH:
            found.extend(entries)
        return 0

    return collect
