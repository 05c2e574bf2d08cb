"""Sparse, pipelined copy of ranges of an NBD export into a local file (python3-libnbd).

The ranges to copy (the whole export for a full backup, the changed ranges for an
incremental) are first classified with ``base:allocation`` block status: runs the server
reports as zeroes (NBD_STATE_ZERO) are never read.  The rest is read with ``aio_pread``
requests of ``request_size`` bytes, ``depth`` of them in flight spread over a few
connections (driven by one thread with select), and written with ``pwrite`` at the same
offset as each completes; a chunk that reads as all zeroes is not written either (the
destination is a fresh sparse file).  Every chunk, in
offset order, then goes to a :class:`ReadBackVerifier`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import select
from dataclasses import dataclass, field
from typing import NamedTuple

import nbd

from snapimg.backup.verify import ReadBackVerifier
from snapimg.errors import BackupError
from snapimg.progress import Progress

Range = tuple[int, int]

REQUEST_SIZE = 1 << 20
DEPTH = 32  # requests in flight over all connections
CONNECTIONS = 4
_STATUS_MAX = 1 << 30


class Piece(NamedTuple):
    offset: int
    length: int
    zero: bool  # the server reported zeroes: not read


@dataclass
class CopyResult:
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_skipped: int = 0  # reported as zeroes by block status: never read
    bytes_zero_read: int = 0  # read, found all zero, not written
    data: list[Range] = field(default_factory=list)  # written ranges, merged
    zero: list[Range] = field(default_factory=list)  # ranges that read as zeroes, merged
    sha256: str | None = None  # of the whole stream, when asked for


def _add(ranges: list[Range], offset: int, length: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == offset:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((offset, length))


class NbdSource:
    """Read connections to one NBD export (the first asks for ``base:allocation``).

    Several connections let the server work on several requests at once; reads of a
    read-only snapshot are consistent across connections whatever the server advertises.
    """

    def __init__(self, uri: str, connections: int = CONNECTIONS) -> None:
        self.uri = uri
        self.handles: list[nbd.NBD] = []
        try:
            for i in range(max(1, connections)):
                h = nbd.NBD()
                h.set_handle_name(f"snapimg-backup-{i}")
                h.set_pread_initialize(False)
                if i == 0:
                    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
                h.connect_uri(uri)
                self.handles.append(h)
        except nbd.Error as err:
            self.close()
            raise BackupError(f"cannot connect to {uri}: {err.string}") from None
        self.h = self.handles[0]
        self.size: int = self.h.get_size()
        self.has_status: bool = bool(self.h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        max_req = self.h.get_block_size(nbd.SIZE_MAXIMUM)
        self.max_request = max_req if max_req > 0 else 32 << 20

    def close(self) -> None:
        for h in self.handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self.handles = []

    def __enter__(self) -> NbdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def zero_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, zero) runs covering [offset, offset+length), merged."""
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        pos = offset

        def push(n: int, zero: bool) -> None:
            nonlocal pos
            if out and out[-1][2] == zero:
                out[-1] = (out[-1][0], out[-1][1] + n, zero)
            else:
                out.append((pos, n, zero))
            pos += n

        entries: list[int] = []

        def extent(meta: str, off: int, ents: list[int], err: int) -> int:
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                entries.extend(ents)
            return 0

        while pos < end:
            if not self.has_status:
                push(end - pos, False)
                break
            entries.clear()
            try:
                self.h.block_status(min(end - pos, _STATUS_MAX), pos, extent)
            except nbd.Error as err:
                raise BackupError(f"block status at {pos} failed: {err.string}") from None
            if not entries:
                raise BackupError(f"server returned no block status at offset {pos}")
            for i in range(0, len(entries), 2):
                n = min(entries[i], end - pos)
                if n <= 0:
                    break
                push(n, bool(entries[i + 1] & nbd.STATE_ZERO))
        return out


def plan(src: NbdSource, ranges: list[Range], request_size: int) -> list[Piece]:
    """Split ``ranges`` (sorted, disjoint) into zero pieces and read requests."""
    pieces: list[Piece] = []
    for offset, length in ranges:
        if offset < 0 or length <= 0 or offset + length > src.size:
            raise BackupError(f"range ({offset}, {length}) outside the export ({src.size})")
        for off, n, zero in src.zero_runs(offset, length):
            if zero:
                pieces.append(Piece(off, n, True))
                continue
            done = 0
            while done < n:
                k = min(request_size, n - done)
                pieces.append(Piece(off + done, k, False))
                done += k
    return pieces


def copy_ranges(src: NbdSource, fd: int, ranges: list[Range], *, hash_stream: bool,
                progress: Progress | None = None, request_size: int = REQUEST_SIZE,
                depth: int = DEPTH) -> CopyResult:
    """Copy ``ranges`` of ``src`` to the same offsets of ``fd`` (a fresh sparse file).

    With ``hash_stream`` the ranges must cover the whole export and the result carries
    the sha256 of the whole image.  Raises :class:`BackupError` on a failed read, write
    or read-back comparison.
    """
    request_size = min(request_size, src.max_request)
    pieces = plan(src, ranges, request_size)
    # The bar follows the slowest stage: the verifier (sha256 of every byte) when hashing,
    # else the reads.
    if progress is not None:
        progress.total = sum(p.length for p in pieces if hash_stream or not p.zero)
    # Buffers are reused (fresh ones cost a page fault per 4 KiB) and made only when
    # needed: a buffer goes free -> read in flight -> written -> verifier -> free.
    nbufs = 2 * depth
    pool: list[bytearray] = []
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    result = CopyResult()
    verifier = ReadBackVerifier(fd, hash_stream=hash_stream, max_chunk=request_size,
                                depth=nbufs + 1, progress=progress if hash_stream else None)
    copier = _Copier(src, fd, pieces, pool, result, None if hash_stream else progress)
    issue = emit = 0
    try:
        while emit < len(pieces):
            while issue < len(pieces) and copier.inflight < depth:
                p = pieces[issue]
                if not p.zero:
                    try:
                        slot = free.get_nowait()
                    except queue.Empty:
                        if len(pool) < nbufs:
                            pool.append(bytearray(request_size))
                            slot = len(pool) - 1
                        elif copier.inflight or emit < issue:
                            break
                        else:  # nothing else can make progress: wait for the verifier
                            slot = free.get()
                    copier.start(issue, slot)
                issue += 1
            while emit < issue:
                p = pieces[emit]
                if p.zero:
                    verifier.put_zero(p.offset, p.length)
                    result.bytes_skipped += p.length
                    _add(result.zero, p.offset, p.length)
                elif emit in copier.done:
                    slot, written = copier.done.pop(emit)
                    verifier.put_data(p.offset, pool[slot], p.length, written,
                                      functools.partial(free.put, slot))
                    _add(result.data if written else result.zero, p.offset, p.length)
                else:
                    break
                emit += 1
            if copier.inflight:
                copier.complete()
        result.sha256 = verifier.finish()
    except nbd.Error as err:
        verifier.abort()
        raise BackupError(f"reading {src.uri} failed: {err.string}") from None
    except OSError as err:
        verifier.abort()
        raise BackupError(f"writing the backup failed: {err.strerror}") from None
    except BaseException:
        verifier.abort()
        raise
    return result


class _Copier:
    """The reads in flight on the connections and what to do when each completes."""

    def __init__(self, src: NbdSource, fd: int, pieces: list[Piece], pool: list[bytearray],
                 result: CopyResult, progress: Progress | None) -> None:
        self.src = src
        self.fd = fd
        self.pieces = pieces
        self.pool = pool
        self.result = result
        self.progress = progress
        self.handles = src.handles
        # per connection: cookie -> (piece index, buffer slot, libnbd buffer)
        self.per_conn: list[dict[int, tuple[int, int, nbd.Buffer]]] = [{} for _ in self.handles]
        self.done: dict[int, tuple[int, bool]] = {}  # idx -> slot, written

    @property
    def inflight(self) -> int:
        return sum(len(c) for c in self.per_conn)

    def start(self, idx: int, slot: int) -> None:
        p = self.pieces[idx]
        nbuf = nbd.Buffer.from_buffer(memoryview(self.pool[slot])[:p.length])
        i = min(range(len(self.handles)), key=lambda k: len(self.per_conn[k]))
        self.per_conn[i][self.handles[i].aio_pread(nbuf, p.offset)] = (idx, slot, nbuf)

    def complete(self) -> None:
        """Wait for at least one read to finish; write every finished one."""
        self._wait()
        for h, inflight in zip(self.handles, self.per_conn, strict=True):
            while inflight:
                cookie = h.aio_peek_command_completed()
                if cookie <= 0:
                    break
                idx, slot, nbuf = inflight.pop(cookie)
                h.aio_command_completed(cookie)  # raises nbd.Error if the read failed
                self._write(idx, slot, nbuf)

    def _wait(self) -> None:
        if len(self.handles) == 1:
            self.handles[0].poll(-1)
            return
        readers: list[int] = []
        writers: list[int] = []
        for h in self.handles:
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                readers.append(h.aio_get_fd())
            if d & nbd.AIO_DIRECTION_WRITE:
                writers.append(h.aio_get_fd())
        can_read, can_write, _ = select.select(readers, writers, [])
        for h in self.handles:
            fd = h.aio_get_fd()
            if fd in can_read:
                h.aio_notify_read()
            if fd in can_write:
                h.aio_notify_write()

    def _write(self, idx: int, slot: int, nbuf: nbd.Buffer) -> None:
        p = self.pieces[idx]
        self.result.bytes_read += p.length
        written = not nbuf.is_zero()
        if written:
            view = memoryview(self.pool[slot])[:p.length]
            if os.pwrite(self.fd, view, p.offset) != p.length:
                raise OSError(errno.ENOSPC, f"short write at {p.offset}")
            self.result.bytes_written += p.length
        else:
            self.result.bytes_zero_read += p.length
        self.done[idx] = (slot, written)
        if self.progress is not None:
            self.progress.add(p.length)
