"""Read connections to one NBD export and its allocation map (python3-libnbd).

Several connections let the server work on several requests at once (reads of a
read-only snapshot or backup point are consistent across connections whatever the
server advertises).  One more connection is for block status only, so that a query is
never queued behind data reads: it asks for ``base:allocation`` (runs the server reports
as zeroes are never read) and, when wanted, ``qemu:allocation-depth`` (which layer of a
qcow2 chain holds a range: what an incremental backup file itself holds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nbd

from snapimg.errors import BackupError, ProtocolError
from snapimg.nbd.allocation import ALLOCATION_DEPTH, depth_one_ranges, status_runs

CONNECTIONS = 4

Run = tuple[int, int, bool]  # offset, length, zero


class NbdReader:
    def __init__(
        self, uri: str, connections: int = CONNECTIONS, *, allocation_depth: bool = False
    ) -> None:
        self.uri = uri
        self.handles: list[nbd.NBD] = []  # for reads
        self.status: nbd.NBD | None = None  # for block status
        try:
            h = self.status = nbd.NBD()
            h.set_handle_name("snapimg-status")
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            if allocation_depth:
                h.add_meta_context(ALLOCATION_DEPTH)
            h.connect_uri(uri)
            for i in range(max(1, connections)):
                r = nbd.NBD()
                r.set_handle_name(f"snapimg-read-{i}")
                r.set_pread_initialize(False)
                r.connect_uri(uri)
                self.handles.append(r)
        except nbd.Error as err:
            self.close()
            raise BackupError(f"cannot connect to {uri}: {err.string}") from None
        self.size: int = h.get_size()
        self.has_status = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.has_depth = allocation_depth and bool(h.can_meta_context(ALLOCATION_DEPTH))
        max_req = h.get_block_size(nbd.SIZE_MAXIMUM)
        self.max_request = max_req if max_req > 0 else 32 << 20

    def close(self) -> None:
        for h in [*self.handles, *([self.status] if self.status else [])]:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self.handles = []
        self.status = None

    def __enter__(self) -> NbdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _status(self, context: str, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(length, flags) of consecutive extents covering the range."""
        assert self.status is not None
        pos = offset
        try:
            for n, flags in status_runs(self.status, context, offset, length):
                yield n, flags
                pos += n
        except nbd.Error as err:
            raise BackupError(f"block status of {self.uri} at {pos} failed: {err.string}") from None
        except ProtocolError as err:
            raise BackupError(f"{self.uri}: {err}") from None

    def runs(self, offset: int, length: int) -> list[Run]:
        """(offset, length, zero) runs covering [offset, offset+length), merged."""
        out: list[Run] = []
        if not self.has_status:
            return [(offset, length, False)] if length > 0 else []
        pos = offset
        for n, flags in self._status(nbd.CONTEXT_BASE_ALLOCATION, offset, length):
            zero = bool(flags & nbd.STATE_ZERO)
            if out and out[-1][2] == zero:
                out[-1] = (out[-1][0], out[-1][1] + n, zero)
            else:
                out.append((pos, n, zero))
            pos += n
        return out

    def top_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Ranges held by the top image of a qcow2 chain (allocation depth 1), merged."""
        if not self.has_depth:
            raise BackupError(f"{self.uri} does not report {ALLOCATION_DEPTH}")
        return depth_one_ranges(self._status(ALLOCATION_DEPTH, offset, length), offset)
