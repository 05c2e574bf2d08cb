"""The engine's block devices (:class:`snapimg.blockdev.BlockDevice`): an origin with
copy-before-write on every write, and a snapshot reading through the store.

Both stand on the data path's public methods (:class:`~snapimg.engine.datapath.DataPath`).
``compiled`` is the C device serving this one on the compiled data path (None on the
Python one): the NBD server hands a plain connection's transmission phase to it.

Errors (both data paths raise the same): every method raises
:class:`~snapimg.errors.OutOfRangeError` (EINVAL) for a range beyond the device's end and
:class:`~snapimg.errors.DeviceError` (EIO) once the engine is closed; the methods name
what else they raise.  A :class:`~snapimg.errors.DeviceError` carries the ``errno`` an
NBD reply gives; :class:`OSError` is the origin file's own I/O error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapimg.blockdev import Extent

if TYPE_CHECKING:
    from snapimg._datapath import Device
    from snapimg.engine.datapath import DataPath, OpenOrigin
    from snapimg.engine.snapshot import SnapshotState


class OriginDevice:
    """An origin, read-write: every write first copies the blocks live snapshots still
    need into the store (copy-before-write)."""

    def __init__(self, dp: DataPath, origin: OpenOrigin) -> None:
        self._dp = dp
        self._o = origin
        self.name = origin.name
        self.compiled: Device | None = dp.compiled_origin(origin)

    @property
    def size(self) -> int:
        return self._o.file.size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def can_trim(self) -> bool:
        return not self._o.file.is_block

    @property
    def can_multi_conn(self) -> bool:
        return True

    def pread(self, offset: int, length: int) -> bytes:
        """The origin's bytes; raises :class:`OSError` when the origin cannot be read."""
        if self.compiled is not None:
            return self.compiled.pread(offset, length)
        return self._dp.origin_read(self._o, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Copy what live snapshots need, then write (``fua``: durable on return).

        When the store cannot take the copies, the snapshots' policy decides: under
        ``invalidate`` they turn invalid and the write goes on; under ``block-writes``
        the write fails with :class:`NoSpaceError` (store full, a ``max_size`` reached)
        or :class:`DeviceError` (store I/O error).  :class:`StoreStalledError`: the
        copies did not complete within the ``cbw_timeout``; :class:`DeviceError` too when
        an invalidation cannot be recorded (the write is then refused);
        :class:`OSError`: the origin cannot be written.  A write that fails leaves every
        snapshot exact."""
        if self.compiled is not None:
            self.compiled.pwrite(offset, data, fua)
        else:
            self._dp.origin_write(self._o, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        """Like :meth:`pwrite` of zeroes (``may_trim``: a hole may be punched); raises
        what it raises."""
        if self.compiled is not None:
            self.compiled.write_zeroes(offset, length, fua, may_trim)
        else:
            self._dp.origin_zero(self._o, offset, length, fua, punch=may_trim)

    def trim(self, offset: int, length: int) -> None:
        """Punch a hole after copy-before-write, as :meth:`write_zeroes` with
        ``may_trim`` (raising what it raises); on a block device only the range is
        checked."""
        if self.compiled is not None:
            self.compiled.trim(offset, length)
        elif self.can_trim:
            self._dp.origin_zero(self._o, offset, length, False, punch=True)
        else:
            self._dp.check_range(self.size, offset, length)

    def flush(self) -> None:
        """The store, then the origin, made durable; :class:`DeviceError`
        (:class:`NoSpaceError` for ENOSPC) when the store cannot be synced,
        :class:`OSError` when the origin cannot."""
        if self.compiled is not None:
            self.compiled.flush()
        else:
            self._dp.origin_flush(self._o)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Holes and data of the origin file from ``offset``: at most 64 extents, which
        may end before ``offset + length`` (all data where the file system cannot say;
        a block device is all data)."""
        if self.compiled is not None:
            return self.compiled.block_status(offset, length)
        return self._dp.origin_block_status(self._o, offset, length)


class SnapshotDevice:
    """A snapshot: preserved blocks read from the store, the rest from the origin;
    read-only unless created writable (its writes then stay in the store).

    Besides the errors of every device, each method but :meth:`flush` raises
    :class:`~snapimg.errors.SnapshotInvalidError` (EIO) once the snapshot is invalid or
    dropped (:meth:`pwrite` and :meth:`write_zeroes` of a read-only snapshot raise
    :class:`~snapimg.errors.ReadOnlyError`, EPERM, first)."""

    def __init__(self, dp: DataPath, origin: OpenOrigin, snap: SnapshotState) -> None:
        self._dp = dp
        self._o = origin
        self._s = snap
        self.name = f"{snap.origin}@{snap.name}"
        self.compiled: Device | None = dp.compiled_snapshot(origin, snap)

    @property
    def size(self) -> int:
        return self._o.file.size

    @property
    def read_only(self) -> bool:
        return not self._s.writable

    @property
    def can_trim(self) -> bool:
        return True

    @property
    def can_multi_conn(self) -> bool:
        return True

    def pread(self, offset: int, length: int) -> bytes:
        """The snapshot's bytes.  Raises :class:`ReleasedRangeError` (EIO) for a range
        that holds a released block, :class:`OSError` when the origin or the store
        cannot be read."""
        if self.compiled is not None:
            return self.compiled.pread(offset, length)
        return self._dp.snap_read(self._o, self._s, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """Write into a writable snapshot's own blocks in the store.  Raises
        :class:`ReadOnlyError` (not writable), :class:`ReleasedRangeError` (a released
        block), :class:`NoSpaceError` (its ``max_size`` reached, or the store is full)
        and :class:`DeviceError` (store I/O error)."""
        if self.compiled is not None:
            self.compiled.pwrite(offset, data, fua)
        else:
            self._dp.snap_write(self._o, self._s, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        """Like :meth:`pwrite` of zeroes; raises what it raises."""
        if self.compiled is not None:
            self.compiled.write_zeroes(offset, length, fua, may_trim)
        else:
            self._dp.snap_zero(self._o, self._s, offset, length, fua)

    def trim(self, offset: int, length: int) -> None:
        """Release: whole blocks in the range stop needing store space and read as EIO
        (:class:`ReleasedRangeError`).  Raises :class:`StoreError` when the store cannot
        record the release (nothing is released)."""
        if self.compiled is not None:
            self.compiled.trim(offset, length)
        else:
            self._dp.snap_release(self._o, self._s, offset, length)

    def flush(self) -> None:
        """The store made durable; :class:`DeviceError` (:class:`NoSpaceError` for
        ENOSPC) when it cannot be synced."""
        if self.compiled is not None:
            self.compiled.flush()
        else:
            self._dp.snap_flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents from ``offset`` (possibly ending early): preserved and private blocks
        are data, the rest is the origin's state."""
        if self.compiled is not None:
            return self.compiled.block_status(offset, length)
        return self._dp.snap_block_status(self._o, self._s, offset, length)
