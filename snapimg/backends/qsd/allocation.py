"""Which clusters a qsd snapshot has preserved, read from QEMU's NBD export.

Snapshot exports are created with ``allocation-depth``: the ``qemu:allocation-depth``
meta context reports depth 1 for clusters held by the snapshot's own qcow2 target, i.e.
the clusters copied there because the origin was written after the snapshot.  That is
both the preserved data and the changed ranges of an incremental backup.  libnbd is
synchronous: call :func:`copied_ranges` in a worker thread.
"""

from __future__ import annotations

import nbd

from snapimg.nbd.allocation import ALLOCATION_DEPTH, depth_one_ranges, status_runs


def copied_ranges(uri: str) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges allocated in the export's top image."""
    h = nbd.NBD()
    h.add_meta_context(ALLOCATION_DEPTH)
    h.connect_uri(uri)
    try:
        if not h.can_meta_context(ALLOCATION_DEPTH):
            raise RuntimeError(f"{uri} does not offer {ALLOCATION_DEPTH}")
        return depth_one_ranges(status_runs(h, ALLOCATION_DEPTH, 0, h.get_size()), 0)
    finally:
        h.shutdown()
