"""A byte range of a :class:`~snapimg.inspect.source.Source` as a seekable binary file.

The filesystem libraries (dissect.fat, dissect.extfs, dissect.ntfs) read from file
objects; :func:`open_slice` gives them a partition of a raw file, an NBD export or a
qemu-opened image alike.
"""

from __future__ import annotations

import io
from typing import BinaryIO, cast

from snapimg.inspect.source import Source


class _SliceIO(io.RawIOBase):
    def __init__(self, src: Source, offset: int, size: int) -> None:
        super().__init__()
        self._src, self._offset, self._size, self._pos = src, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        data = self._src.pread(self._offset + self._pos, n)
        buf[:n] = data
        self._pos += n
        return n


def open_slice(src: Source, offset: int, size: int) -> BinaryIO:
    """A buffered read-only file over ``[offset, offset+size)`` of ``src`` (clipped to its end)."""
    size = max(0, min(size, src.size - offset))
    return cast(BinaryIO, io.BufferedReader(_SliceIO(src, offset, size), buffer_size=128 * 1024))
