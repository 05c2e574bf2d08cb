"""An NBD export's allocation as a client reads it (python3-libnbd, synchronous):
NBD_CMD_BLOCK_STATUS of one meta context as consecutive runs, and the ranges at
``qemu:allocation-depth`` 1, those the top image of a qcow2 chain holds (what a qsd
snapshot preserved, what an incremental backup point itself holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import nbd

from snapimg.errors import ProtocolError

ALLOCATION_DEPTH = "qemu:allocation-depth"
# One block status request covers at most this much (NBD lengths are 32-bit).
STATUS_MAX = (4 << 30) - (4 << 20)


def status_runs(h: nbd.NBD, context: str, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(length, flags) of the consecutive extents of meta context ``context`` covering
    [offset, offset+length).  Raises libnbd's ``nbd.Error``, and :class:`ProtocolError`
    when the server reports no extent."""
    end = offset + length
    pos = offset
    entries: list[int] = []

    def extent(meta: str, off: int, ents: list[int], err: int) -> int:
        if meta == context:
            entries.extend(ents)
        return 0

    while pos < end:
        entries.clear()
        h.block_status(min(end - pos, STATUS_MAX), pos, extent)
        if not entries:
            raise ProtocolError(f"no block status at offset {pos}")
        for i in range(0, len(entries) - 1, 2):
            n = min(entries[i], end - pos)
            if n <= 0:
                break
            yield n, entries[i + 1]
            pos += n


def depth_one_ranges(runs: Iterable[tuple[int, int]], offset: int) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges at allocation depth 1 among ``runs`` of
    ``qemu:allocation-depth`` starting at ``offset`` (:func:`status_runs`)."""
    out: list[tuple[int, int]] = []
    pos = offset
    for n, depth in runs:
        if depth == 1:
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((pos, n))
        pos += n
    return out
