"""A plain file as a BlockDevice: lets the NBD server be tested without the engine."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from snapimg.blockdev import Extent
from snapimg.errors import OutOfRangeError, ReadOnlyError


class FileDevice:
    def __init__(
        self, path: Path, read_only: bool = False, can_trim: bool = True, multi_conn: bool = True
    ) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.fstat(self.fd).st_size
        self._read_only = read_only
        self._can_trim = can_trim
        self._multi_conn = multi_conn
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_trim(self) -> bool:
        return self._can_trim

    @property
    def can_multi_conn(self) -> bool:
        return self._multi_conn

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OutOfRangeError(f"{offset}+{length} beyond {self._size}")

    def pread(self, offset: int, length: int) -> bytes:
        self._range(offset, length)
        self.gate.wait()
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self._read_only:
            raise ReadOnlyError("read-only")
        self._range(offset, len(data))
        self.calls.append(f"write {offset} {len(data)} fua={fua}")
        os.pwrite(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None:
        self._range(offset, length)
        self.calls.append(f"zero {offset} {length} may_trim={may_trim}")
        os.pwrite(self.fd, bytes(length), offset)

    def trim(self, offset: int, length: int) -> None:
        self._range(offset, length)
        self.calls.append(f"trim {offset} {length}")
        os.pwrite(self.fd, bytes(length), offset)

    def flush(self) -> None:
        self.calls.append("flush")
        os.fsync(self.fd)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._range(offset, length)
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = self._size
            if data > pos:
                n = min(data, end) - pos
                out.append(Extent(n, True, True))
                pos += n
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append(Extent(n, False, False))
            pos += n
        return out

    def close(self) -> None:
        os.close(self.fd)
