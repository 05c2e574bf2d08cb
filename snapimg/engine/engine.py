"""The engine: copy-before-write on origin writes, snapshot reads, lifecycle, durability.

Locking: ``_barrier`` is held shared by every I/O and exclusively by snapshot create,
drop and release, so those see no I/O in flight.  ``_lock`` guards the in-memory state,
slot allocation and the log; it is held for bookkeeping only, never across data I/O.
An origin write copies the blocks a live snapshot still needs (pread origin run, one
pwrite into consecutive slots), records the copy under ``_lock`` (:meth:`_install`),
and only then writes the origin.  A snapshot read that took a block from the origin
looks again afterwards and rereads it from the store if a copy was installed meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from snapimg.backends.base import ON_FULL_CHOICES, OnFull, SnapshotInfo
from snapimg.engine import records as R
from snapimg.engine.barrier import Barrier
from snapimg.engine.devices import OriginDevice, SnapshotDevice
from snapimg.engine.index import GEN_SHIFT, MAX_GEN, SLOT_MASK, OriginIndex
from snapimg.engine.opening import current_boot_id as current_boot_id  # re-exported
from snapimg.engine.opening import open_file_store
from snapimg.engine.origin import Origin
from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.state import OriginEntry, StoreState
from snapimg.engine.store import Fault, RamStore, Store
from snapimg.errors import (
    DeviceError,
    NoSpaceError,
    OutOfRangeError,
    ReadOnlyError,
    ReleasedRangeError,
    SnapshotError,
    SnapshotInvalidError,
    StoreError,
    UsageError,
)
from snapimg.names import check_snapshot_name
from snapimg.units import check_block_size

Durability = Literal["default", "strict"]
def _store_error(err: OSError) -> DeviceError:
    if err.errno == errno.ENOSPC:
        return NoSpaceError(f"preservation store is full: {err.strerror}")
    return DeviceError(f"preservation store I/O error: {err.strerror or err}")


class _Open:
    """An origin opened in this engine: its file and its store entry."""

    def __init__(self, file: Origin, entry: OriginEntry) -> None:
        self.file = file
        self.entry = entry
        self.index: OriginIndex = entry.index
        self.nblocks = entry.index.nblocks


class Engine:
    def __init__(
        self, store: Store, state: StoreState, origins: dict[str, _Open], strict: bool
    ) -> None:
        self.store = store
        self.state = state
        self.origins = origins
        self.strict = strict
        self.block_size = state.block_size
        self._barrier = Barrier()
        self._lock = threading.Lock()
        self._snap_locks: dict[tuple[str, int], threading.Lock] = {}
        self._closed = False

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store_dir: Path | str | None,
        origins: Mapping[str, Path | str],
        block_size: int = 65536,
        durability: Durability = "default",
        *,
        boot_id: str | None = None,
        fault: Fault | None = None,
    ) -> Engine:
        """Open ``origins`` ({name: path}) with the store in ``store_dir`` (created if
        missing; None: a RAM store).  ``boot_id`` overrides the host's boot id and
        ``fault`` injects store I/O errors (both for tests)."""
        check_block_size(block_size)
        if durability not in ("default", "strict"):
            raise UsageError(f"bad durability {durability!r}: expected default or strict")
        strict = durability == "strict"
        boot = boot_id or current_boot_id()
        files: dict[str, Origin] = {}
        try:
            for name, path in origins.items():
                files[name] = Origin(name, Path(path))
            if store_dir is None:
                state = StoreState(block_size)
                store: Store = RamStore(block_size, fault)
                for name, f in files.items():
                    state.register(name, f.size, f.fingerprint(create_tag=False))
            else:
                store, state = open_file_store(
                    Path(store_dir), files, block_size, strict, boot, fault
                )
        except BaseException:
            for f in files.values():
                f.close()
            raise
        opened = {n: _Open(f, state.by_name[n]) for n, f in files.items()}
        return cls(store, state, opened, strict)

    # -- lifecycle -------------------------------------------------------------------

    def _origin(self, name: str) -> _Open:
        o = self.origins.get(name)
        if o is None:
            raise SnapshotError(f"unknown origin {name!r}")
        return o

    def _snap(self, o: _Open, snap: str) -> SnapshotState:
        for s in o.index.snaps.values():
            if s.name == snap:
                return s
        raise SnapshotError(f"no snapshot {o.entry.name}@{snap}")

    def _log(self, recs: list[R.Record]) -> tuple[int, list[int]]:
        """Append records and apply them; with ``_lock`` held.  Raises OSError."""
        seq = self.store.append(b"".join(R.encode(r) for r in recs))
        freed: list[int] = []
        for r in recs:
            freed.extend(self.state.apply(r))
        self.store.free(freed)
        return seq, freed

    def _log_meta(self, recs: list[R.Record]) -> None:
        """A lifecycle change: logged, and durable in strict mode."""
        try:
            seq, _ = self._log(recs)
            if self.strict:
                self.store.sync_upto(seq)
            if self.store.wants_checkpoint():
                # no I/O in flight (callers hold the barrier exclusively): compact the log
                blob = b"".join(R.encode(r) for r in self.state.checkpoint_records())
                self.store.checkpoint(blob, clean=False)
        except OSError as err:
            raise StoreError(f"cannot record in the store: {err.strerror or err}") from err

    def origin_device(self, name: str) -> OriginDevice:
        return OriginDevice(self, self._origin(name))

    def snapshot_device(self, origin: str, snap: str) -> SnapshotDevice:
        o = self._origin(origin)
        return SnapshotDevice(self, o, self._snap(o, snap))

    def create_snapshot(
        self,
        origin: str,
        snap: str,
        max_size: int | None = None,
        writable: bool = False,
        on_full: OnFull = "invalidate",
    ) -> SnapshotInfo:
        o = self._origin(origin)
        check_snapshot_name(snap)
        if on_full not in ON_FULL_CHOICES:
            raise UsageError(f"bad on_full {on_full!r}: expected one of {ON_FULL_CHOICES}")
        if max_size is not None and max_size < 0:
            raise UsageError(f"bad max size {max_size}")
        with self._barrier.exclusive(), self._lock:
            self._check_open()
            if any(s.name == snap for s in o.index.snaps.values()):
                raise SnapshotError(f"snapshot {origin}@{snap} exists")
            gen = o.index.next_gen
            if gen > MAX_GEN:
                raise SnapshotError(f"origin {origin} ran out of snapshot generations")
            rec = R.SnapRec(
                o.entry.id, gen, time.time(), max_size, writable, on_full, True, 0.0, 0, snap, ""
            )
            self._log_meta([rec])
            return o.index.snaps[gen].info(self.block_size)

    def snapshots(self) -> list[SnapshotInfo]:
        with self._lock:
            return [
                s.info(self.block_size)
                for o in self.origins.values()
                for s in sorted(o.index.snaps.values(), key=lambda s: s.gen)
            ]

    def drop_snapshot(self, origin: str, snap: str) -> None:
        o = self._origin(origin)
        with self._barrier.exclusive(), self._lock:
            self._check_open()
            s = self._snap(o, snap)
            self._log_meta([R.GenRec(o.entry.id, s.gen)])
        self.store.reclaim()  # outside the locks: hole punching may be slow

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        o = self._origin(origin)
        bs = self.block_size
        with self._lock:
            s = self._snap(o, snap)
            self._check_valid(s)
            runs = o.index.changed_blocks(s.gen)
        size = o.file.size
        return [(b * bs, min(n * bs, size - b * bs)) for b, n in runs]

    def flush(self) -> None:
        self._sync_store()
        for o in self.origins.values():
            o.file.datasync()

    def close(self) -> None:
        with self._barrier.exclusive(), self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.store.reclaim()
                self.store.sync()
                for o in self.origins.values():
                    o.file.datasync()
                blob = b"".join(R.encode(r) for r in self.state.checkpoint_records())
                self.store.checkpoint(blob, clean=True)
            except OSError as err:
                raise StoreError(f"cannot close store cleanly: {err.strerror or err}") from err
            finally:
                self.store.close()
                for o in self.origins.values():
                    o.file.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError("engine is closed")

    def check_io(self) -> None:
        """I/O on a device of a closed engine is refused (EIO)."""
        if self._closed:
            raise DeviceError("the engine is closed")

    def _sync_store(self) -> None:
        try:
            self.store.sync()
        except OSError as err:
            raise _store_error(err) from err

    @staticmethod
    def _check_valid(s: SnapshotState) -> None:
        if not s.valid or s.dropped:
            why = "was dropped" if s.dropped else f"is invalid: {s.reason}"
            raise SnapshotInvalidError(f"snapshot {s.origin}@{s.name} {why}")

    def _check_range(self, size: int, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > size:
            raise OutOfRangeError(f"request [{offset}, +{length}) beyond device end {size}")

    # -- origin writes -----------------------------------------------------------------

    def origin_write(
        self, o: _Open, offset: int, data: bytes | memoryview, fua: bool
    ) -> None:
        n = len(data)
        if offset < 0 or offset + n > o.file.size or not n:
            self._check_range(o.file.size, offset, n)
            return
        barrier = self._barrier
        barrier.acquire_shared()
        try:
            if self._closed:
                self.check_io()
            if o.index.live:
                bs = self.block_size
                self._preserve(o, offset // bs, (offset + n - 1) // bs + 1)
            if fua:
                o.file.pwrite(data, offset)
                self._sync_store()
                o.file.datasync()
            else:
                done = os.pwrite(o.file.fd, data, offset)
                if done != n:  # a short write: finish it
                    o.file.pwrite(memoryview(data)[done:], offset + done)
        finally:
            barrier.release_shared()
            if self.store.pending:
                self.store.reclaim()

    def origin_zero(self, o: _Open, offset: int, length: int, fua: bool, punch: bool) -> None:
        self._check_range(o.file.size, offset, length)
        if not length:
            return
        bs = self.block_size
        with self._barrier.shared():
            self.check_io()
            if o.index.live:
                self._preserve(o, offset // bs, (offset + length - 1) // bs + 1)
            o.file.write_zeroes(offset, length, punch)
            if fua:
                self._sync_store()
                o.file.datasync()
        self.store.reclaim()

    def _preserve(self, o: _Open, b0: int, b1: int) -> None:
        """Copy what live snapshots need of blocks [b0, b1) before they are overwritten."""
        runs = o.index.plan(b0, b1 - b0)
        if not runs:
            return
        seq = 0
        for b, n in runs:
            seq = max(seq, self._copy_run(o, b, n))
        if self.strict and seq:
            try:
                self.store.sync_upto(seq)
            except OSError as err:
                raise _store_error(err) from err

    def _copy_run(self, o: _Open, b: int, n: int) -> int:
        bs = self.block_size
        gen = o.index.newest
        with self._lock:
            extents = self.store.alloc(n)
        data = o.file.pread(b * bs, n * bs)
        if len(data) < n * bs:  # the origin's last, partial block
            data = data.ljust(n * bs, b"\0")
        view = memoryview(data)
        try:
            pos = 0
            for slot, count in extents:
                self.store.write_slots(slot, view[pos * bs : (pos + count) * bs])
                pos += count
        except OSError as err:
            with self._lock:
                self.store.free_runs(extents)
                return self._store_failed(o, b, n, gen, err)
        with self._lock:
            return self._install(o, b, n, gen, extents)

    def _install(
        self, o: _Open, b: int, n: int, gen: int, extents: list[tuple[int, int]]
    ) -> int:
        """Record a copied run (``_lock`` held); enforces max sizes first."""
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
            names = ", ".join(f"{s.origin}@{s.name}" for s in over)
            raise NoSpaceError(f"snapshot {names} reached its max size (policy block-writes)")
        for s in over:
            seq = self._invalidate(o, s, "preservation store reached max size")
        recs: list[R.Record] = []
        pos = 0
        for slot, count in extents:
            recs.append(R.RunRec(R.Kind.COPY, o.entry.id, gen, b + pos, count, slot))
            pos += count
        try:
            seq, _ = self._log(recs)
        except OSError as err:
            self.store.free_runs(extents)
            return self._store_failed(o, b, n, gen, err)
        return seq

    def _store_failed(self, o: _Open, b: int, n: int, gen: int, err: OSError) -> int:
        """The store could not take a copy: apply the needing snapshots' policy."""
        needers = [o.index.snaps[g] for g in o.index.demand(b, n, gen)]
        if any(s.on_full == "block-writes" for s in needers):
            raise _store_error(err)
        seq = 0
        for s in needers:
            seq = self._invalidate(o, s, f"preservation store write failed: {err.strerror}")
        return seq

    def _invalidate(self, o: _Open, s: SnapshotState, reason: str) -> int:
        try:
            seq, _ = self._log([R.InvalidateRec(o.entry.id, s.gen, time.time(), reason)])
        except OSError as err:
            # Not recorded: the snapshot must stay valid, so the origin write may not run.
            raise DeviceError(
                f"cannot record that {s.origin}@{s.name} is invalid ({reason}): "
                f"{err.strerror or err}; origin write refused"
            ) from err
        return seq

    # -- snapshot I/O --------------------------------------------------------------------

    def snap_read(self, o: _Open, s: SnapshotState, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > o.file.size or length <= 0:
            self._check_range(o.file.size, offset, length)
            return b""
        bs = self.block_size
        b0, b1 = offset // bs, (offset + length - 1) // bs + 1
        barrier = self._barrier
        barrier.acquire_shared()
        try:
            if self._closed or not s.valid or s.dropped:
                self.check_io()
                self._check_valid(s)
            if s.released.starts and s.released.overlaps(b0, b1):
                raise ReleasedRangeError(
                    f"snapshot {s.origin}@{s.name}: range [{offset}, +{length}) was released"
                )
            segs = self._sources(o, s, b0, b1 - b0)
            if len(segs) == 1 and segs[0][0] >= 0:  # all in consecutive slots
                data = self.store.read_slots(segs[0][0], length, offset - b0 * bs)
            else:
                data = self._read_blocks(o, s, segs, offset, length)
            if not s.valid:  # invalidated while we read: the slots may be reused
                self._check_valid(s)
            return data
        finally:
            barrier.release_shared()

    def _sources(self, o: _Open, s: SnapshotState, b0: int, n: int) -> list[list[int]]:
        """[slot or -1 for the origin, first block, count] runs for blocks [b0, b0+n)."""
        idx = o.index
        ents = idx.table.get_run(b0, n)
        limit = s.gen << GEN_SHIFT
        if not s.private:
            if max(ents) < limit:
                return [[-1, b0, n]]
            first = ents[0]
            # one run of consecutive slots of one generation, no older versions around
            if first >= limit and not idx.overflow and ents == array("Q", range(first, first + n)):
                return [[(first & SLOT_MASK) - 1, b0, n]]
        segs: list[list[int]] = []
        private, overflow = s.private, idx.overflow
        for i, e in enumerate(ents):
            b = b0 + i
            if private and b in private:
                slot = private[b]
            elif e < limit:
                slot = -1
            elif overflow and b in overflow:
                slot = idx.lookup(b, s.gen)
            else:
                slot = (e & SLOT_MASK) - 1
            if segs:
                last = segs[-1]
                if (slot < 0 and last[0] < 0) or (last[0] >= 0 and slot == last[0] + last[2]):
                    last[2] += 1
                    continue
            segs.append([slot, b, 1])
        return segs

    def _read_blocks(
        self, o: _Open, s: SnapshotState, segs: list[list[int]], start: int, length: int
    ) -> bytes:
        """Snapshot content of bytes [start, +length), whose blocks come from ``segs``."""
        bs = self.block_size
        end = start + length
        parts: list[bytes] = []
        from_origin: list[list[int]] = []
        for slot, b, count in segs:
            lo, hi = max(start, b * bs), min(end, (b + count) * bs)
            if slot < 0:
                parts.append(o.file.pread(lo, hi - lo))
                from_origin.append([len(parts) - 1, b, count, lo, hi])
            else:
                parts.append(self.store.read_slots(slot, hi - lo, lo - b * bs))
        # A copy installed while we read the origin means the origin may already hold
        # newer data there: take those blocks from the copy instead.
        for part_no, b, count, lo, hi in from_origin:
            again = self._sources(o, s, b, count)
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
        self, o: _Open, s: SnapshotState, offset: int, data: bytes | memoryview, fua: bool
    ) -> None:
        n = len(data)
        self._check_range(o.file.size, offset, n)
        if not s.writable:
            raise ReadOnlyError(f"snapshot {s.origin}@{s.name} is read-only")
        if not n:
            return
        bs = self.block_size
        view = memoryview(data)
        lock = self._snap_locks.setdefault((o.entry.name, s.gen), threading.Lock())
        with self._barrier.shared(), lock:
            self.check_io()
            self._check_valid(s)
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
                self._sync_store()
        self.store.reclaim()

    def _snap_write_block(
        self, o: _Open, s: SnapshotState, b: int, within: int, piece: memoryview
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
                segs = self._sources(o, s, b, 1)
                buf = bytearray(self._read_blocks(o, s, segs, b * bs, bs))
                buf.extend(bytes(bs - len(buf)))
                buf[within : within + len(piece)] = piece
            limit = s.max_blocks(bs)
            with self._lock:
                grows = o.index.lookup(b, s.gen) < 0
                if limit is not None and s.preserved + grows > limit:
                    raise NoSpaceError(f"snapshot {s.origin}@{s.name} reached its max size")
                ((slot, _),) = self.store.alloc(1)
            try:
                self.store.write_slots(slot, buf)
                with self._lock:
                    seq, _ = self._log([R.RunRec(R.Kind.PRIVATE, o.entry.id, s.gen, b, 1, slot)])
            except OSError:
                with self._lock:
                    self.store.free([slot])
                raise
            if self.strict:
                self.store.sync_upto(seq)
        except OSError as err:
            raise _store_error(err) from err

    def snap_release(self, o: _Open, s: SnapshotState, offset: int, length: int) -> None:
        self._check_range(o.file.size, offset, length)
        bs = self.block_size
        b0 = (offset + bs - 1) // bs
        end = offset + length
        b1 = o.nblocks if end == o.file.size else end // bs
        if b1 <= b0:
            return
        with self._barrier.exclusive(), self._lock:
            self._check_valid(s)
            self._log_meta([R.RangeRec(R.Kind.RELEASE, o.entry.id, s.gen, b0, b1 - b0)])
        self.store.reclaim()

    def snap_is_preserved(self, o: _Open, s: SnapshotState, b0: int, n: int) -> list[list[int]]:
        return self._sources(o, s, b0, n)
