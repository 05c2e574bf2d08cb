"""The compiled data path: C decides the common cases, the Python reference the rest.

``snapimg._datapath`` (csrc/datapath/, built by ``pip install``) serves origin and
snapshot I/O without the GIL: the copy-before-write decision, the common first copy
(slots, block copy, COPY record, table entries), origin reads and writes, snapshot
reads and block status, flushes, and a plain NBD connection's whole transmission
phase.  It calls back into this module's slow paths, which run the reference methods
of :class:`~snapimg.engine.datapath.DataPath`, where Python must decide: other copies
(older copies to keep, exclusions, limits reached, strict durability, copy timeouts),
snapshot writes and releases, snapshots with private or released blocks, a store
without files (RAM store, injected faults), failures.

The block table, the slot allocator and the record log's end live in C, shared with
Python under the core's log lock; the protocol (who holds which lock, what is published
when) is in docs/architecture.md.

``SNAPIMG_DATAPATH`` selects the data path: ``compiled`` (the default where the
extension is built), or ``python`` (the reference implementation).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

from snapimg.blockdev import Extent
from snapimg.engine import records as R
from snapimg.engine.barrier import BarrierContexts
from snapimg.engine.cstore import SharedFileStore
from snapimg.engine.datapath import DataPath, OpenOrigin
from snapimg.engine.reflink import clones
from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.state import StoreState
from snapimg.engine.store import Fault, FileStore, Store
from snapimg.engine.table import Table
from snapimg.errors import UsageError

if TYPE_CHECKING:
    from snapimg._datapath import Core, Device
    from snapimg._datapath import Table as CTable

_datapath: ModuleType | None
try:
    from snapimg import _datapath
except ImportError:  # not built: the Python data path only
    _datapath = None

ENV = "SNAPIMG_DATAPATH"
# "off": never clone blocks; "always": clone runs whose origin pages are dirty too (a
# clone writes them back first); default "on": clone clean runs (benchmarks compare)
REFLINK_ENV = "SNAPIMG_REFLINK"


def available() -> bool:
    return _datapath is not None


def choose(requested: str | None) -> bool:
    """True for the compiled data path: ``requested``, else $SNAPIMG_DATAPATH, else
    compiled where the extension is built (checks $SNAPIMG_REFLINK too)."""
    want = requested or os.environ.get(ENV) or "auto"
    if want == "python":
        return False
    if want == "compiled":
        if _datapath is None:
            raise UsageError(
                f"{ENV}=compiled, but the C extension snapimg._datapath is not built "
                "(reinstall snapimg with gcc and python3-dev present)"
            )
        reflink_mode()
        return True
    if want == "auto":
        if _datapath is not None:
            reflink_mode()
        return _datapath is not None
    raise UsageError(f"bad {ENV} {want!r}: expected compiled or python")


def reflink_mode() -> str:
    mode = os.environ.get(REFLINK_ENV) or "on"
    if mode not in ("on", "off", "always"):
        raise UsageError(f"bad {REFLINK_ENV} {mode!r}: expected on, off or always")
    return mode


class Parts:
    """What an engine on the compiled data path is made of before its data path exists:
    the C core (with its barrier), the block table class and the store class."""

    def __init__(self, block_size: int) -> None:
        assert _datapath is not None
        self.barrier = CompiledBarrier()
        self._sync: Callable[[], None] | None = None
        self.core: Core = _datapath.Core(block_size, self.barrier, self._sync_store)
        self.table: Callable[[int], Table] = _datapath.Table

    def _sync_store(self) -> None:
        assert self._sync is not None
        self._sync()

    def file_store(
        self, path: Path, block_size: int, strict: bool, boot_id: str, fault: Fault | None
    ) -> FileStore:
        return SharedFileStore(path, block_size, strict, boot_id, fault, core=self.core)


def _ctable(o: OpenOrigin) -> CTable:
    """The C block table of an origin on the compiled data path."""
    return cast("CTable", o.index.table)


def _limit(s: SnapshotState, block_size: int) -> int:
    """A snapshot's limit in blocks for C (-1: none)."""
    limit = s.max_blocks(block_size)
    return -1 if limit is None else limit


def name_of(dp: DataPath) -> str:
    return "compiled" if isinstance(dp, CompiledDataPath) else "python"


_CBarrier = _datapath.Barrier if _datapath else object


class CompiledBarrier(_CBarrier, BarrierContexts):  # type: ignore[misc,valid-type]
    """The C barrier, with the context managers of the Python one."""


class OriginSlowPath:
    """What C asks Python for on an origin: the copies a write needs first."""

    def __init__(self, dp: DataPath, o: OpenOrigin) -> None:
        self.dp = dp
        self.o = o

    def preserve(self, b0: int, b1: int) -> None:
        """Copy what live snapshots need of blocks [b0, b1) (the barrier is held shared
        by the C caller)."""
        self.dp.preserve(self.o, b0, b1)

    def settle_copy(self, b: int, n: int, gen: int, slot: int, err: int) -> None:
        """C copied blocks [b, b+n) for generation ``gen`` into slots from ``slot`` but
        did not record them: something changed meanwhile or a limit is reached (err 0:
        record them as Python does, policies included), or the copy or its record failed
        (err: free the slots, apply the snapshots' policy)."""
        dp = self.dp
        with dp.lock:
            if err:
                dp.store.free_runs([(slot, n)])
                dp._store_failed(self.o, b, n, gen, OSError(err, os.strerror(err)))
            else:
                dp._install(self.o, b, n, gen, [(slot, n)])

    def reclaim(self) -> None:
        """Give freed store space back (C calls it after a write, outside the barrier,
        when the store said slots were freed: ``Store.on_pending``)."""
        self.dp.store.reclaim()


class SnapshotSlowPath:
    """The snapshot operations C leaves to the reference data path."""

    def __init__(self, dp: DataPath, o: OpenOrigin, s: SnapshotState) -> None:
        self.dp = dp
        self.o = o
        self.s = s

    def read(self, offset: int, length: int) -> bytes:
        return self.dp.snap_read(self.o, self.s, offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.dp.snap_write(self.o, self.s, offset, data, fua)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.dp.snap_zero(self.o, self.s, offset, length, fua)

    def trim(self, offset: int, length: int) -> None:
        self.dp.snap_release(self.o, self.s, offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.dp.snap_block_status(self.o, self.s, offset, length)


class CompiledDataPath(DataPath):
    def __init__(
        self,
        store: Store,
        state: StoreState,
        origins: dict[str, OpenOrigin],
        strict: bool,
        parts: Parts,
    ) -> None:
        super().__init__(store, state, origins, strict, parts.barrier)
        self.core = parts.core
        parts._sync = self.sync_store
        self._held = threading.local()  # this thread holds the core's log lock
        self._numbers: dict[str, int] = {}
        mode = reflink_mode()
        wanted = mode != "off"
        store_clones = isinstance(store, FileStore) and clones(store.path)
        for name, o in origins.items():
            can = store_clones and self._same_filesystem(o) and not o.file.is_block
            self._numbers[name] = self.core.add_origin(
                id=o.entry.id,
                fd=o.file.fd,
                size=o.file.size,
                table=_ctable(o),
                is_block=o.file.is_block,
                reflink=can and wanted,
                copy_range=not can or wanted,  # copy_file_range clones where it can
                clone_dirty=mode == "always",
            )
            if can and wanted and isinstance(store, FileStore):
                store.reserve_data = False  # clones replace preallocated space anyway
        self._bind_store()
        store.on_pending = self.core.note_pending
        if isinstance(store, FileStore):
            store.on_reopen = self._bind_store  # the log file is replaced at checkpoints
        with self.settled():
            pass  # the live snapshots' counts, for C's installs
        self._fast_install()

    # -- C's first-copy installs: what Python folds in and tells C -------------------------

    @property
    def cbw_timeout(self) -> float | None:
        return self.__dict__.get("_cbw_timeout")

    @cbw_timeout.setter
    def cbw_timeout(self, seconds: float | None) -> None:
        self.__dict__["_cbw_timeout"] = seconds
        if "core" in self.__dict__:
            self._fast_install()

    def _fast_install(self) -> None:
        """C installs first copies itself where nothing needs Python: a store with files
        shared with C, no strict durability (group commit is Python's), no copy timeout
        (its bounded waits are Python's)."""
        store = self.store
        shared = isinstance(store, SharedFileStore) and store.shared and self._c_store
        self.core.set_fast_install(shared and not self.strict and self.cbw_timeout is None)

    @contextmanager
    def settled(self) -> Iterator[None]:
        """Hold the core's log lock (C installs wait), fold into the snapshots what C
        installed meanwhile, and afterwards tell C the live snapshots' counts and limits.
        Reentrant within a thread (``log`` inside ``_install`` inside this)."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self.core.lock_log()
        self._held.depth = 1
        try:
            for o in self.origins.values():
                for gen, blocks in _ctable(o).fold():
                    o.index.snaps[gen].preserved += blocks
            yield
        finally:
            try:
                for o in self.origins.values():
                    idx = o.index
                    _ctable(o).set_counts(
                        [(g, idx.snaps[g].preserved, _limit(idx.snaps[g], self.block_size))
                         for g in idx.live]
                    )  # fmt: skip
            finally:
                self._held.depth = 0
                self.core.unlock_log()

    def log(self, recs: list[R.Record]) -> tuple[int, list[int]]:
        with self.settled():
            return super().log(recs)

    def _install(
        self, o: OpenOrigin, b: int, n: int, gen: int, extents: list[tuple[int, int]]
    ) -> int:
        with self.settled():  # the counts it checks limits against, and its record, atomic
            return super()._install(o, b, n, gen, extents)

    def _same_filesystem(self, o: OpenOrigin) -> bool:
        assert isinstance(self.store, FileStore)
        return os.fstat(self.store.data_fd).st_dev == os.fstat(o.file.fd).st_dev

    def _bind_store(self) -> None:
        """Store files for C, unless the store has none or faults are injected (the
        ``fault`` hook given at open: store I/O then goes through Python)."""
        store = self.store
        self._c_store = isinstance(store, FileStore) and store.fault is None
        if isinstance(store, FileStore) and self._c_store:
            self.core.set_store(store.data_fd, store.meta_fd)
        else:
            self.core.set_store(-1, -1)

    def close(self) -> None:
        super().close()
        self.core.close()

    def copy_blocks(self, o: OpenOrigin, b: int, n: int, extents: list[tuple[int, int]]) -> None:
        if not self._c_store or self.store.fault is not None:
            super().copy_blocks(o, b, n, extents)
            return
        self.core.copy(self._numbers[o.name], b, extents)
        assert isinstance(self.store, FileStore)  # (C copies only into a store's files)
        self.store.data_written()  # strict mode syncs it before the record

    def reflink(self, origin: str) -> bool:
        """Whether copies of ``origin``'s blocks are clones (so far; a run whose origin
        pages are dirty in the page cache is copied all the same)."""
        return self.core.reflink(self._numbers[origin])

    def copy_stats(self) -> dict[str, int]:
        """Block runs copied so far, by how: ``clone_runs`` (FICLONERANGE),
        ``copy_range_runs`` (copy_file_range), ``rw_runs`` (read + write), of which
        ``dirty_runs`` were not cloned because the origin's pages were dirty."""
        return self.core.stats()

    def compiled_origin(self, o: OpenOrigin) -> Device:
        return self.core.device(
            self._numbers[o.name],
            OriginSlowPath(self, o),
            read_only=False,
            can_trim=not o.file.is_block,
        )

    def compiled_snapshot(self, o: OpenOrigin, s: SnapshotState) -> Device:
        return self.core.device(
            self._numbers[o.name],
            SnapshotSlowPath(self, o, s),
            gen=s.gen,
            read_only=not s.writable,
            can_trim=True,
        )
