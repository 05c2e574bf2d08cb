"""The engine's block devices (:class:`snapimg.blockdev.BlockDevice`): an origin with
copy-before-write on every write, and a snapshot reading through the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapimg.blockdev import Extent
from snapimg.errors import ReadOnlyError

if TYPE_CHECKING:
    from snapimg.engine.engine import Engine, _Open
    from snapimg.engine.snapshot import SnapshotState

_STATUS_BLOCKS = 1 << 16  # blocks one block_status call looks at, at most


def _merge(out: list[Extent], ext: Extent) -> None:
    if out and out[-1].hole == ext.hole and out[-1].zero == ext.zero:
        out[-1] = Extent(out[-1].length + ext.length, ext.hole, ext.zero)
    elif ext.length:
        out.append(ext)


class OriginDevice:
    def __init__(self, engine: Engine, origin: _Open) -> None:
        self._engine = engine
        self._o = origin
        self.name = origin.entry.name

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
        self._engine._check_range(self.size, offset, length)
        self._engine.check_io()
        return self._o.file.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._engine.origin_write(self._o, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        self._engine.origin_zero(self._o, offset, length, fua, punch=may_trim)

    def trim(self, offset: int, length: int) -> None:
        if self.can_trim:
            self._engine.origin_zero(self._o, offset, length, False, punch=True)
        else:
            self._engine._check_range(self.size, offset, length)

    def flush(self) -> None:
        self._engine.check_io()
        self._engine._sync_store()
        self._o.file.datasync()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._engine._check_range(self.size, offset, length)
        self._engine.check_io()
        return self._o.file.extents(offset, length)


class SnapshotDevice:
    def __init__(self, engine: Engine, origin: _Open, snap: SnapshotState) -> None:
        self._engine = engine
        self._o = origin
        self._s = snap
        self.name = f"{snap.origin}@{snap.name}"

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
        return self._engine.snap_read(self._o, self._s, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._engine.snap_write(self._o, self._s, offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        if not self._s.writable:
            raise ReadOnlyError(f"snapshot {self.name} is read-only")
        self._engine._check_range(self.size, offset, length)
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            self._engine.snap_write(self._o, self._s, pos, zeros[:n], fua)
            pos += n

    def trim(self, offset: int, length: int) -> None:
        """Release: whole blocks in the range stop needing store space and read as EIO."""
        self._engine.snap_release(self._o, self._s, offset, length)

    def flush(self) -> None:
        self._engine.check_io()
        self._engine._sync_store()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Preserved (and private) blocks are data; the rest is the origin's state."""
        eng = self._engine
        eng._check_range(self.size, offset, length)
        eng.check_io()
        eng._check_valid(self._s)
        if not length:
            return []
        bs = eng.block_size
        end = offset + length
        b0 = offset // bs
        b1 = min((end - 1) // bs + 1, b0 + _STATUS_BLOCKS)
        out: list[Extent] = []
        for slot, b, count in eng.snap_is_preserved(self._o, self._s, b0, b1 - b0):
            lo, hi = max(offset, b * bs), min(end, (b + count) * bs)
            if slot >= 0:
                _merge(out, Extent(hi - lo, False, False))
                continue
            pos = lo
            while pos < hi:
                exts = self._o.file.extents(pos, hi - pos)
                if not exts:
                    break
                for ext in exts:
                    _merge(out, ext)
                    pos += ext.length
        return out
