"""The engine: opening a store with its origins, the snapshot lifecycle, devices.

I/O runs in the data path (:mod:`snapimg.engine.datapath`, the Python reference, or
:mod:`snapimg.engine.compiled`, the C one); the engine changes the lifecycle under the
data path's barrier (held exclusively: no I/O in flight) and metadata lock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from snapimg.engine import compiled
from snapimg.engine import records as R
from snapimg.engine.barrier import Barrier
from snapimg.engine.datapath import DataPath, OpenOrigin
from snapimg.engine.devices import OriginDevice, SnapshotDevice
from snapimg.engine.opening import current_boot_id as current_boot_id  # re-exported
from snapimg.engine.opening import open_file_store
from snapimg.engine.origin import Origin
from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.state import StoreState
from snapimg.engine.store import Fault, FileStore, RamStore, Store
from snapimg.engine.table import MAX_GEN
from snapimg.errors import EngineClosedError, SnapshotError, StoreError, UsageError
from snapimg.names import check_snapshot_name
from snapimg.snapinfo import ON_FULL_CHOICES, OnFull, SnapshotInfo
from snapimg.units import check_block_size, check_max_size

Durability = Literal["default", "strict"]


class Engine:
    """Origins opened with their preservation store: the snapshot lifecycle and the
    devices that serve origins and snapshots (docs/library-api.md).

    Every method may be called from several threads at once.  Errors are
    :mod:`snapimg.errors` classes, named per method below; an unknown origin or snapshot
    is a :class:`SnapshotError` throughout.  After :meth:`close`, lifecycle calls raise
    :class:`EngineClosedError` and device I/O fails with :class:`DeviceError` (EIO).
    """

    def __init__(self, dp: DataPath) -> None:
        self.dp = dp
        self.store = dp.store
        self.state = dp.state
        self.origins = dp.origins
        self.strict = dp.strict
        self.block_size = dp.block_size
        self.datapath = compiled.name_of(dp)

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
        datapath: str | None = None,
        cbw_timeout: float | None = None,
    ) -> Engine:
        """Open ``origins`` ({name: path}) with the store in ``store_dir`` (created if
        missing; None: a RAM store).  ``datapath``: "compiled" or "python" (default:
        $SNAPIMG_DATAPATH, else compiled where built).  ``cbw_timeout``: seconds an
        origin write waits for its copies into the store (None: as long as it takes;
        docs/library-api.md).  ``boot_id`` overrides the host's boot id and ``fault``
        injects store I/O errors (both for tests).

        Raises :class:`UsageError` (a bad block size, durability, timeout or data path;
        an origin that cannot be opened or is no regular file or block device),
        :class:`StoreFormatError` (a truncated, corrupted or unknown store),
        :class:`StoreMismatchError` (the store was made for another file or block size)
        and :class:`StoreError` (the store is in use or cannot be created); a failing
        open changes nothing."""
        check_block_size(block_size)
        if cbw_timeout is not None and not 0 < cbw_timeout <= 3600:
            raise UsageError(f"bad cbw timeout {cbw_timeout!r}: expected 0 < seconds <= 3600")
        if durability not in ("default", "strict"):
            raise UsageError(f"bad durability {durability!r}: expected default or strict")
        parts = compiled.Parts(block_size) if compiled.choose(datapath) else None
        table = parts.table if parts else None
        strict = durability == "strict"
        boot = boot_id or current_boot_id()
        files: dict[str, Origin] = {}
        try:
            for name, path in origins.items():
                files[name] = Origin(name, Path(path))
                twin = next(
                    (n for n, f in files.items() if n != name and f.same_file(files[name])), None
                )
                if twin is not None:
                    raise UsageError(f"origins {twin!r} and {name!r} are the same image {path}")
            if store_dir is None:
                state = StoreState(block_size) if table is None else StoreState(block_size, table)
                store: Store = RamStore(block_size, fault)
                for name, f in files.items():
                    state.register(name, f.size, f.fingerprint(create_tag=False))
            else:
                store, state = open_file_store(
                    Path(store_dir),
                    files,
                    block_size,
                    strict,
                    boot,
                    fault,
                    table,
                    parts.file_store if parts else FileStore,
                )
        except BaseException:
            for f in files.values():
                f.close()
            raise
        opened = {n: OpenOrigin(f, state.by_name[n]) for n, f in files.items()}
        if parts:
            dp: DataPath = compiled.CompiledDataPath(store, state, opened, strict, parts)
        else:
            dp = DataPath(store, state, opened, strict, Barrier())
        dp.cbw_timeout = cbw_timeout
        return cls(dp)

    # -- lifecycle -------------------------------------------------------------------

    def _origin(self, name: str) -> OpenOrigin:
        o = self.origins.get(name)
        if o is None:
            raise SnapshotError(f"unknown origin {name!r}")
        return o

    def _snap(self, o: OpenOrigin, snap: str) -> SnapshotState:
        for s in o.index.snaps.values():
            if s.name == snap:
                return s
        raise SnapshotError(f"no snapshot {o.name}@{snap}")

    def origin_device(self, name: str) -> OriginDevice:
        """The origin ``name`` as a device; :class:`SnapshotError` if there is none."""
        return OriginDevice(self.dp, self._origin(name))

    def snapshot_device(self, origin: str, snap: str) -> SnapshotDevice:
        """Snapshot ``origin@snap`` as a device; :class:`SnapshotError` if there is none.
        The device keeps serving that snapshot only: once it is dropped, its I/O fails
        with :class:`SnapshotInvalidError` (even if a new snapshot takes the name)."""
        o = self._origin(origin)
        return SnapshotDevice(self.dp, o, self._snap(o, snap))

    def create_snapshot(
        self,
        origin: str,
        snap: str,
        max_size: int | None = None,
        writable: bool = False,
        on_full: OnFull = "invalidate",
    ) -> SnapshotInfo:
        """Snapshot ``origin`` now, as ``snap``: atomic with respect to writes, copies
        nothing (O(1)).

        Raises :class:`UsageError` (a name against :mod:`snapimg.names`, a bad
        ``on_full`` or ``max_size``), :class:`SnapshotError` (no such origin, the name
        exists, the origin's generations are used up), :class:`EngineClosedError` and
        :class:`StoreError` (the store cannot record it: no snapshot was made)."""
        o = self._origin(origin)
        check_snapshot_name(snap)
        if on_full not in ON_FULL_CHOICES:
            raise UsageError(f"bad on_full {on_full!r}: expected one of {ON_FULL_CHOICES}")
        if max_size is not None:
            check_max_size(max_size, self.block_size)
        dp = self.dp
        with dp.barrier.exclusive(), dp.lock:
            self._check_open()
            if any(s.name == snap for s in o.index.snaps.values()):
                raise SnapshotError(f"snapshot {origin}@{snap} exists")
            gen = o.index.next_gen
            if gen > MAX_GEN:
                raise SnapshotError(f"origin {origin} ran out of snapshot generations")
            rec = R.SnapRec(
                origin=o.entry.id,
                gen=gen,
                created=time.time(),
                max_size=max_size,
                writable=writable,
                on_full=on_full,
                valid=True,
                invalid_time=0.0,
                preserved=0,
                name=snap,
                reason="",
            )
            if self.strict:  # what the snapshot reads from the origin must survive power loss
                try:
                    o.file.datasync()
                except OSError as err:
                    raise StoreError(f"cannot flush origin {origin}: {err.strerror}") from err
            # durable in every mode: after a power loss it is listed (invalid), not lost
            dp.log_meta([rec], durable=True)
            return o.index.snaps[gen].info(self.block_size)

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot of every origin, oldest first per origin; raises nothing."""
        with self.dp.lock, self.dp.settled():
            return [
                s.info(self.block_size)
                for o in self.origins.values()
                for s in sorted(o.index.snaps.values(), key=lambda s: s.gen)
            ]

    def drop_snapshot(self, origin: str, snap: str) -> None:
        """Drop ``origin@snap`` and free the store space no other snapshot shares.

        Raises :class:`SnapshotError` (no such origin or snapshot),
        :class:`EngineClosedError` and :class:`StoreError` (the store cannot record it:
        the snapshot stays)."""
        o = self._origin(origin)
        dp = self.dp
        with dp.barrier.exclusive(), dp.lock:
            self._check_open()
            s = self._snap(o, snap)
            dp.log_meta([R.DropRec(o.entry.id, s.gen)])
        self.store.reclaim()  # outside the locks: hole punching may be slow

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        """(offset, length) ranges, block aligned and merged, written on the origin since
        ``snap`` was created (a superset: blocks it released or wrote itself count too).

        Raises :class:`SnapshotError` (no such origin or snapshot) and
        :class:`SnapshotInvalidError` (the snapshot is invalid)."""
        o = self._origin(origin)
        bs = self.block_size
        with self.dp.lock, self.dp.settled():
            s = self._snap(o, snap)
            self.dp.check_valid(s)
            runs = o.index.changed_blocks(s.gen)
        size = o.file.size
        return [(b * bs, min(n * bs, size - b * bs)) for b, n in runs]

    def flush(self) -> None:
        """Make the store, then every origin, durable.  Raises :class:`DeviceError`
        (:class:`NoSpaceError` for ENOSPC) when the store cannot be synced and
        :class:`OSError` when an origin cannot."""
        self.dp.sync_store()
        for o in self.origins.values():
            o.file.datasync()

    def close(self) -> None:
        """Flush and write a clean checkpoint, then close the store and the origins;
        idempotent.  Raises :class:`StoreError` when the store cannot be closed cleanly
        (it is closed all the same; the next open replays its log)."""
        dp = self.dp
        with dp.barrier.exclusive(), dp.lock:
            if dp.closed:
                return
            dp.close()
            try:
                self.store.reclaim()
                self.store.sync()
                for o in self.origins.values():
                    o.file.datasync()
                with dp.settled():
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
        if self.dp.closed:
            raise EngineClosedError("the engine is closed")
