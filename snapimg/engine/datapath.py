"""The copy-before-write data path in Python: the reference implementation.

Every I/O on an origin or a snapshot ends here (or in the compiled data path,
:mod:`snapimg.engine.compiled`, which decides the common cases in C and calls back into
these methods for the rest).  The engine (:mod:`snapimg.engine.engine`) changes the
snapshot lifecycle through :meth:`DataPath.log_meta` under the barrier.

Locking: ``barrier`` is held shared by every I/O and exclusively by snapshot create,
drop and release, so those see no I/O in flight.  ``lock`` guards the in-memory state,
slot allocation and the log; it is held for bookkeeping only, never across data I/O.
An origin write copies the blocks a live snapshot still needs (pread origin run, one
pwrite into consecutive slots), records the copy under ``lock`` (:meth:`_install`),
and only then writes the origin.  A snapshot read that took a block from the origin
looks again afterwards and rereads it from the store if a copy was installed meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from snapimg.blockdev import Extent
from snapimg.engine import records as R
from snapimg.engine.barrier import BarrierContexts
from snapimg.engine.bounded import BoundedRunner, Job
from snapimg.engine.index import OriginIndex, Segment
from snapimg.engine.origin import Origin
from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.state import OriginEntry, StoreState
from snapimg.engine.store import Store
from snapimg.errors import (
    DeviceError,
    NoSpaceError,
    OutOfRangeError,
    ReadOnlyError,
    ReleasedRangeError,
    SnapshotInvalidError,
    StoreError,
    StoreStalledError,
)
from snapimg.units import format_size

if TYPE_CHECKING:
    from snapimg._datapath import Device

STATUS_BLOCKS = 1 << 16  # blocks one snapshot block_status call looks at, at most


def limit_text(s: SnapshotState) -> str:
    """A snapshot's own store limit, for the messages that name it."""
    return f"--max-size {format_size(s.max_size or 0)}"


def store_error(err: OSError) -> DeviceError:
    if err.errno == errno.ENOSPC:
        return NoSpaceError(f"preservation store is full: {err.strerror}")
    return DeviceError(f"preservation store I/O error: {err.strerror or err}")


class OpenOrigin:
    """An origin opened in this engine: its file and its store entry."""

    def __init__(self, file: Origin, entry: OriginEntry) -> None:
        self.file = file
        self.entry = entry
        self.name = entry.name
        self.index: OriginIndex = entry.index
        self.nblocks = entry.index.nblocks


def merge_extent(out: list[Extent], ext: Extent) -> None:
    """Append ``ext`` to ``out``, merged with the last extent when their states match."""
    if out and out[-1].hole == ext.hole and out[-1].zero == ext.zero:
        out[-1] = Extent(out[-1].length + ext.length, ext.hole, ext.zero)
    elif ext.length:
        out.append(ext)


class DataPath:
    def __init__(
        self,
        store: Store,
        state: StoreState,
        origins: dict[str, OpenOrigin],
        strict: bool,
        barrier: BarrierContexts,
    ) -> None:
        self.store = store
        self.state = state
        self.origins = origins
        self.strict = strict
        self.block_size = state.block_size
        self.barrier = barrier
        self.lock = threading.Lock()
        self.closed = False
        self.cbw_timeout: float | None = None  # seconds a write waits for its copies
        self.runner = BoundedRunner()

    def close(self) -> None:
        """From now on I/O is refused (barrier held exclusively by the caller)."""
        self.closed = True

    @contextmanager
    def settled(self) -> Iterator[None]:
        """The in-memory state complete and still (with ``lock`` held: callers reading
        the index or counters, checkpoints); the compiled data path folds in what C
        recorded meanwhile and holds C's installs off."""
        yield

    def compiled_origin(self, o: OpenOrigin) -> Device | None:
        """The C device serving origin ``o`` (None: this data path has none)."""
        return None

    def compiled_snapshot(self, o: OpenOrigin, s: SnapshotState) -> Device | None:
        """The C device serving snapshot ``s`` of ``o`` (None: this data path has none)."""
        return None

    # -- checks --------------------------------------------------------------------------

    def check_io(self) -> None:
        """I/O on a device of a closed engine is refused (EIO)."""
        if self.closed:
            raise DeviceError("the engine is closed")

    @staticmethod
    def check_range(size: int, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > size:
            raise OutOfRangeError(f"request [{offset}, +{length}) beyond device end {size}")

    @staticmethod
    def check_valid(s: SnapshotState) -> None:
        if not s.valid or s.dropped:
            why = "was dropped" if s.dropped else f"is invalid: {s.reason}"
            raise SnapshotInvalidError(f"snapshot {s.origin}@{s.name} {why}")

    def sync_store(self) -> None:
        try:
            self.store.sync()
        except OSError as err:
            raise store_error(err) from err

    # -- the record log --------------------------------------------------------------------

    def log(self, recs: list[R.Record]) -> tuple[int, list[int]]:
        """Append records and apply them; with ``lock`` held.  Raises OSError."""
        seq = self.store.append(b"".join(R.encode(r) for r in recs))
        freed: list[int] = []
        for r in recs:
            freed.extend(self.state.apply(r))
        self.store.free(freed)
        return seq, freed

    def log_meta(self, recs: list[R.Record], durable: bool = False) -> None:
        """A lifecycle change (barrier held exclusively, ``lock`` held): logged, and
        durable in strict mode (``durable``: in every mode)."""
        try:
            seq, _ = self.log(recs)
            if self.strict or durable:
                self.store.sync_upto(seq)
            if self.store.wants_checkpoint():
                # no I/O in flight: compact the log
                with self.settled():
                    blob = b"".join(R.encode(r) for r in self.state.checkpoint_records())
                self.store.checkpoint(blob, clean=False)
        except OSError as err:
            raise StoreError(f"cannot record in the store: {err.strerror or err}") from err

    # -- origin I/O --------------------------------------------------------------------------

    def origin_read(self, o: OpenOrigin, offset: int, length: int) -> bytes:
        self.check_range(o.file.size, offset, length)
        self.check_io()
        return o.file.pread(offset, length)

    def origin_write(self, o: OpenOrigin, offset: int, data: bytes | memoryview, fua: bool) -> None:
        n = len(data)
        if offset < 0 or offset + n > o.file.size or not n:
            self.check_range(o.file.size, offset, n)
            return
        barrier = self.barrier
        barrier.acquire_shared()
        try:
            if self.closed:
                self.check_io()
            if o.index.live:
                bs = self.block_size
                self.preserve(o, offset // bs, (offset + n - 1) // bs + 1)
            if fua:
                o.file.pwrite(data, offset)
                self.sync_store()
                o.file.datasync()
            else:
                done = os.pwrite(o.file.fd, data, offset)
                if done != n:  # a short write: finish it
                    o.file.pwrite(memoryview(data)[done:], offset + done)
        finally:
            barrier.release_shared()
            if self.store.pending:
                self.store.reclaim()

    def origin_zero(self, o: OpenOrigin, offset: int, length: int, fua: bool, punch: bool) -> None:
        self.check_range(o.file.size, offset, length)
        if not length:
            return
        bs = self.block_size
        try:
            with self.barrier.shared():
                self.check_io()
                if o.index.live:
                    self.preserve(o, offset // bs, (offset + length - 1) // bs + 1)
                o.file.write_zeroes(offset, length, punch)
                if fua:
                    self.sync_store()
                    o.file.datasync()
        finally:
            if self.store.pending:
                self.store.reclaim()

    def origin_flush(self, o: OpenOrigin) -> None:
        self.check_io()
        self.sync_store()
        o.file.datasync()

    def origin_block_status(self, o: OpenOrigin, offset: int, length: int) -> list[Extent]:
        self.check_range(o.file.size, offset, length)
        self.check_io()
        return o.file.extents(offset, length)

    def preserve(self, o: OpenOrigin, b0: int, b1: int) -> None:
        """Copy what live snapshots need of blocks [b0, b1) before they are overwritten
        (the barrier held shared); with ``cbw_timeout``, within that time or else apply
        the snapshots' policy (:meth:`_preserve_in_time`)."""
        runs = o.index.plan(b0, b1 - b0)
        if not runs:
            return
        if self.cbw_timeout is None:
            self._copy_runs(o, runs, None)
        else:
            self._preserve_in_time(o, runs, self.cbw_timeout)

    def _copy_runs(self, o: OpenOrigin, runs: list[tuple[int, int]], job: Job[None] | None) -> None:
        seq = 0
        for b, n in runs:
            seq = max(seq, self._copy_run(o, b, n, job))
        if self.strict and seq:
            try:
                self.store.sync_upto(seq)
            except OSError as err:
                raise store_error(err) from err

    def _preserve_in_time(self, o: OpenOrigin, runs: list[tuple[int, int]], timeout: float) -> None:
        """The copies run on a store thread; the writer waits for them, and for what
        follows, ``timeout`` seconds in all.  Late (after three quarters of it, at most
        one second before the end): snapshots that need the blocks under
        ``block-writes`` refuse the write (EIO); otherwise they are invalidated, and the
        write proceeds only if that is recorded before the deadline (else EIO: the
        origin was not written, the snapshots stay exact; should the stalled store
        complete that record later, they turn invalid then, visibly).  A copy that
        completes after its writer gave up records nothing."""
        deadline = time.monotonic() + timeout
        job = self.runner.submit(lambda job: self._copy_runs(o, runs, job))
        if job is not None and job.wait(timeout - min(timeout / 4, 1.0)):
            job.result()
            return
        if job is not None:
            job.abandoned = True
        late = f"copy-before-write into the store did not complete within {timeout:g} s"
        if not self.lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise StoreStalledError(f"{late}; the store is busy: origin write refused")
        try:
            gen = o.index.newest
            needers = {g: o.index.snaps[g] for b, n in runs for g in o.index.demand(b, n, gen)}
        finally:
            self.lock.release()
        blocking = [s for s in needers.values() if s.on_full == "block-writes"]
        if blocking:
            names = ", ".join(f"{s.origin}@{s.name}" for s in blocking)
            raise StoreStalledError(f"{late} (snapshot {names}: policy block-writes)")
        reason = f"{late} (--cbw-timeout)"

        def invalidate(job: Job[None]) -> None:
            with self.lock:
                if job.abandoned:
                    return
                seq = 0
                for s in needers.values():
                    if s.valid:
                        seq = self._invalidate(o, s, reason)
            if self.strict and seq:
                self.store.sync_upto(seq)

        record = self.runner.submit(invalidate)
        if record is None or not record.wait(deadline - time.monotonic()):
            if record is not None:
                record.abandoned = True
            raise StoreStalledError(
                f"{late}, nor could the store record that the snapshots needing the "
                "blocks are invalid: origin write refused, the snapshots stay valid"
            )
        try:
            record.result()
        except OSError as err:
            raise store_error(err) from err

    def copy_blocks(self, o: OpenOrigin, b: int, n: int, extents: list[tuple[int, int]]) -> None:
        """Copy origin blocks [b, b+n) into the slot runs ``extents``; raises OSError."""
        bs = self.block_size
        data = o.file.pread(b * bs, n * bs)
        if len(data) < n * bs:  # the origin's last, partial block
            data = data.ljust(n * bs, b"\0")
        view = memoryview(data)
        pos = 0
        for slot, count in extents:
            self.store.write_slots(slot, view[pos * bs : (pos + count) * bs])
            pos += count

    def _copy_run(self, o: OpenOrigin, b: int, n: int, job: Job[None] | None) -> int:
        gen = o.index.newest
        with self.lock:
            extents = self.store.alloc(n)
        try:
            self.copy_blocks(o, b, n, extents)
        except OSError as err:
            with self.lock:
                self.store.free_runs(extents)
                if job is not None and job.abandoned:
                    return 0
                return self._store_failed(o, b, n, gen, err)
        with self.lock:
            if job is not None and job.abandoned:  # its writer gave up and moved on
                self.store.free_runs(extents)
                return 0
            return self._install(o, b, n, gen, extents)

    def _install(
        self, o: OpenOrigin, b: int, n: int, gen: int, extents: list[tuple[int, int]]
    ) -> int:
        """Record a copied run (``lock`` held); enforces max sizes first."""
        idx = o.index
        demand = idx.demand(b, n, gen)
        seq = 0
        over = []
        for g, count in demand.items():
            s = idx.snaps[g]
            limit = s.max_blocks(self.block_size)
            if limit is not None and s.preserved + count > limit:
                over.append(s)
        if any(s.on_full == "block-writes" for s in over):
            self.store.free_runs(extents)
            names = ", ".join(f"{s.origin}@{s.name} ({limit_text(s)})" for s in over)
            raise NoSpaceError(f"snapshot {names} reached its max size (policy block-writes)")
        for s in over:
            seq = self._invalidate(o, s, f"the snapshot reached its max size ({limit_text(s)})")
        recs: list[R.Record] = []
        pos = 0
        for slot, count in extents:
            recs.append(
                R.RunRec(
                    kind=R.Kind.COPY,
                    origin=o.entry.id,
                    gen=gen,
                    block=b + pos,
                    count=count,
                    slot=slot,
                )
            )
            pos += count
        try:
            seq, _ = self.log(recs)
        except OSError as err:
            self.store.free_runs(extents)
            return self._store_failed(o, b, n, gen, err)
        return seq

    def _store_failed(self, o: OpenOrigin, b: int, n: int, gen: int, err: OSError) -> int:
        """The store could not take a copy: apply the needing snapshots' policy."""
        needers = [o.index.snaps[g] for g in o.index.demand(b, n, gen)]
        if any(s.on_full == "block-writes" for s in needers):
            raise store_error(err)
        seq = 0
        for s in needers:
            seq = self._invalidate(o, s, f"preservation store write failed: {err.strerror}")
        return seq

    def _invalidate(self, o: OpenOrigin, s: SnapshotState, reason: str) -> int:
        try:
            rec = R.InvalidateRec(origin=o.entry.id, gen=s.gen, time=time.time(), reason=reason)
            seq, _ = self.log([rec])
        except OSError as err:
            # Not recorded: the snapshot must stay valid, so the origin write may not run.
            raise DeviceError(
                f"cannot record that {s.origin}@{s.name} is invalid ({reason}): "
                f"{err.strerror or err}; origin write refused"
            ) from err
        return seq

    # -- snapshot I/O ------------------------------------------------------------------------

    def snap_read(self, o: OpenOrigin, s: SnapshotState, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > o.file.size or length <= 0:
            self.check_range(o.file.size, offset, length)
            return b""
        bs = self.block_size
        b0, b1 = offset // bs, (offset + length - 1) // bs + 1
        barrier = self.barrier
        barrier.acquire_shared()
        own = s.access if s.writable else None  # its own writes free copies
        if own is not None:
            own.acquire_shared()
        try:
            if self.closed or not s.valid or s.dropped:
                self.check_io()
                self.check_valid(s)
            if s.released.starts and s.released.overlaps(b0, b1):
                raise ReleasedRangeError(
                    f"snapshot {s.origin}@{s.name}: range [{offset}, +{length}) was released"
                )
            segs = o.index.sources(s, b0, b1 - b0)
            if len(segs) == 1 and segs[0][0] >= 0:  # all in consecutive slots
                data = self.store.read_slots(segs[0][0], length, offset - b0 * bs)
            else:
                data = self._read_blocks(o, s, segs, offset, length)
            if not s.valid:  # invalidated while we read: the slots may be reused
                self.check_valid(s)
            return data
        finally:
            if own is not None:
                own.release_shared()
            barrier.release_shared()

    def _read_blocks(
        self, o: OpenOrigin, s: SnapshotState, segs: list[Segment], start: int, length: int
    ) -> bytes:
        """Snapshot content of bytes [start, +length), whose blocks come from ``segs``."""
        bs = self.block_size
        end = start + length
        parts: list[bytes] = []
        from_origin: list[tuple[int, int, int, int, int]] = []
        for slot, b, count in segs:
            lo, hi = max(start, b * bs), min(end, (b + count) * bs)
            if slot < 0:
                parts.append(o.file.pread(lo, hi - lo))
                from_origin.append((len(parts) - 1, b, count, lo, hi))
            else:
                parts.append(self.store.read_slots(slot, hi - lo, lo - b * bs))
        # A copy installed while we read the origin means the origin may already hold
        # newer data there: take those blocks from the copy instead.
        for part_no, b, count, lo, hi in from_origin:
            again = o.index.sources(s, b, count)
            if len(again) == 1 and again[0][0] < 0:
                continue
            buf = bytearray(parts[part_no])
            for slot, bb, cnt in again:
                if slot < 0:
                    continue
                blo, bhi = max(lo, bb * bs), min(hi, (bb + cnt) * bs)
                buf[blo - lo : bhi - lo] = self.store.read_slots(slot, bhi - blo, blo - bb * bs)
            parts[part_no] = bytes(buf)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def snap_write(
        self, o: OpenOrigin, s: SnapshotState, offset: int, data: bytes | memoryview, fua: bool
    ) -> None:
        n = len(data)
        self.check_range(o.file.size, offset, n)
        if not s.writable:
            raise ReadOnlyError(f"snapshot {s.origin}@{s.name} is read-only")
        if not n:
            return
        bs = self.block_size
        view = memoryview(data)
        try:
            with self.barrier.shared(), s.access.exclusive():
                self.check_io()
                self.check_valid(s)
                b0, b1 = offset // bs, (offset + n - 1) // bs + 1
                if s.released and s.released.overlaps(b0, b1):
                    raise ReleasedRangeError(f"snapshot {s.origin}@{s.name}: range was released")
                pos = 0
                for b in range(b0, b1):
                    lo = max(offset, b * bs)
                    hi = min(offset + n, (b + 1) * bs)
                    self._snap_write_block(o, s, b, lo - b * bs, view[pos : pos + hi - lo])
                    pos += hi - lo
                if fua:
                    self.sync_store()
        finally:  # blocks written before a failure may have freed shared copies
            self.store.reclaim()

    def _snap_write_block(
        self, o: OpenOrigin, s: SnapshotState, b: int, within: int, piece: memoryview
    ) -> None:
        bs = self.block_size
        slot = s.private.get(b)
        try:
            if slot is not None:
                self.store.write_slots(slot, piece, within)
                return
            if within == 0 and len(piece) == bs:
                buf = bytearray(piece)
            else:
                segs = o.index.sources(s, b, 1)
                buf = bytearray(self._read_blocks(o, s, segs, b * bs, bs))
                buf.extend(bytes(bs - len(buf)))
                buf[within : within + len(piece)] = piece
            with self.lock:
                self._check_private_room(o, s, b)  # refused before any store I/O
                ((slot, _),) = self.store.alloc(1)
            try:
                self.store.write_slots(slot, buf)
                # The limit again, and the record, in one hold: copies the snapshot needs
                # (origin writes; C's installs, folded in by settled) may have been counted
                # while the block was written.
                with self.lock, self.settled():
                    self._check_private_room(o, s, b)
                    rec = R.RunRec(
                        kind=R.Kind.PRIVATE,
                        origin=o.entry.id,
                        gen=s.gen,
                        block=b,
                        count=1,
                        slot=slot,
                    )
                    seq, _ = self.log([rec])
            except (OSError, NoSpaceError):
                with self.lock:
                    self.store.free([slot])
                raise
            if self.strict:
                self.store.sync_upto(seq)
        except OSError as err:
            raise store_error(err) from err

    def _check_private_room(self, o: OpenOrigin, s: SnapshotState, b: int) -> None:
        """Refuse (NoSpaceError) a private block ``b`` that would take writable snapshot
        ``s`` past its max size (``lock`` held)."""
        limit = s.max_blocks(self.block_size)
        if limit is not None and s.preserved + (o.index.lookup(b, s.gen) < 0) > limit:
            raise NoSpaceError(
                f"snapshot {s.origin}@{s.name} reached its max size ({limit_text(s)})"
            )

    def snap_zero(
        self, o: OpenOrigin, s: SnapshotState, offset: int, length: int, fua: bool
    ) -> None:
        if not s.writable:
            raise ReadOnlyError(f"snapshot {s.origin}@{s.name} is read-only")
        self.check_range(o.file.size, offset, length)
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            self.snap_write(o, s, pos, zeros[:n], fua)
            pos += n

    def snap_release(self, o: OpenOrigin, s: SnapshotState, offset: int, length: int) -> None:
        """Whole blocks in the range stop needing store space and read as EIO."""
        self.check_range(o.file.size, offset, length)
        bs = self.block_size
        b0 = (offset + bs - 1) // bs
        end = offset + length
        b1 = o.nblocks if end == o.file.size else end // bs
        if b1 <= b0:
            return
        with self.barrier.exclusive(), self.lock:
            self.check_io()
            self.check_valid(s)
            rel = R.RangeRec(
                kind=R.Kind.RELEASE, origin=o.entry.id, gen=s.gen, block=b0, count=b1 - b0
            )
            self.log_meta([rel])
        self.store.reclaim()

    def snap_flush(self) -> None:
        self.check_io()
        self.sync_store()

    def snap_block_status(
        self, o: OpenOrigin, s: SnapshotState, offset: int, length: int
    ) -> list[Extent]:
        """Preserved (and private) blocks are data; the rest is the origin's state."""
        self.check_range(o.file.size, offset, length)
        self.check_io()
        self.check_valid(s)
        if not length:
            return []
        bs = self.block_size
        end = offset + length
        b0 = offset // bs
        b1 = min((end - 1) // bs + 1, b0 + STATUS_BLOCKS)
        out: list[Extent] = []
        for slot, b, count in o.index.sources(s, b0, b1 - b0):
            lo, hi = max(offset, b * bs), min(end, (b + count) * bs)
            if slot >= 0:
                merge_extent(out, Extent(hi - lo, False, False))
                continue
            run: list[Extent] = []
            pos = lo
            while pos < hi:
                exts = o.file.extents(pos, hi - pos)
                if not exts:
                    break
                run.extend(exts)
                pos += sum(ext.length for ext in exts)
            # A copy installed while we asked the origin: an origin write (a punched hole,
            # zeroes) may already be what we saw there.  Data is always a true answer.
            again = o.index.sources(s, b, count)
            if len(again) != 1 or again[0][0] >= 0:
                run = [Extent(pos - lo, False, False)]
            for ext in run:
                merge_extent(out, ext)
        return out
