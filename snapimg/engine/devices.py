"""The engine's block devices (:class:`snapimg.blockdev.BlockDevice`): an origin with
copy-before-write on every write, and a snapshot reading through the store.

Both stand on the data path's public methods (:class:`~snapimg.engine.datapath.DataPath`).
``compiled`` is the C device serving this one on the compiled data path (None on the
Python one): the NBD server hands a plain connection's transmission phase to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapimg.blockdev import Extent

if TYPE_CHECKING:
    from snapimg._datapath import Device
    from snapimg.engine.datapath import DataPath, OpenOrigin
    from snapimg.engine.snapshot import SnapshotState


class OriginDevice:
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
        if self.compiled is not None:
            return self.compiled.pread(offset, length)
        return self._dp.origin_read(self._o, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.compiled is not None:
            self.compiled.pwrite(offset, data, fua)
        else:
            self._dp.origin_write(self._o, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        if self.compiled is not None:
            self.compiled.write_zeroes(offset, length, fua, may_trim)
        else:
            self._dp.origin_zero(self._o, offset, length, fua, punch=may_trim)

    def trim(self, offset: int, length: int) -> None:
        if self.compiled is not None:
            self.compiled.trim(offset, length)
        elif self.can_trim:
            self._dp.origin_zero(self._o, offset, length, False, punch=True)
        else:
            self._dp.check_range(self.size, offset, length)

    def flush(self) -> None:
        if self.compiled is not None:
            self.compiled.flush()
        else:
            self._dp.origin_flush(self._o)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.compiled is not None:
            return self.compiled.block_status(offset, length)
        return self._dp.origin_block_status(self._o, offset, length)


class SnapshotDevice:
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
        if self.compiled is not None:
            return self.compiled.pread(offset, length)
        return self._dp.snap_read(self._o, self._s, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.compiled is not None:
            self.compiled.pwrite(offset, data, fua)
        else:
            self._dp.snap_write(self._o, self._s, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        if self.compiled is not None:
            self.compiled.write_zeroes(offset, length, fua, may_trim)
        else:
            self._dp.snap_zero(self._o, self._s, offset, length, fua)

    def trim(self, offset: int, length: int) -> None:
        """Release: whole blocks in the range stop needing store space and read as EIO."""
        if self.compiled is not None:
            self.compiled.trim(offset, length)
        else:
            self._dp.snap_release(self._o, self._s, offset, length)

    def flush(self) -> None:
        if self.compiled is not None:
            self.compiled.flush()
        else:
            self._dp.snap_flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.compiled is not None:
            return self.compiled.block_status(offset, length)
        return self._dp.snap_block_status(self._o, self._s, offset, length)
