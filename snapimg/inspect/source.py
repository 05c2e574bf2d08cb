"""Uniform random-access, read-only view of what ``inspect``, ``diff`` and friends look at.

A :class:`Source` is a raw image file (or block device), an NBD export (``nbd://``,
``nbd+unix://`` URI, read through libnbd), or a non-raw image (qcow2, ...) that
qemu-storage-daemon exports to us over a private unix socket.  Every source answers
``pread`` and ``extents``, the allocation map as :class:`snapimg.blockdev.Extent` runs:
``SEEK_DATA``/``SEEK_HOLE`` on files, ``base:allocation`` block status on NBD.
"""

from __future__ import annotations

import contextlib
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import nbd

from snapimg.blockdev import Extent
from snapimg.errors import DeviceError, UsageError
from snapimg.fileio import data_runs

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")

# libnbd's STATE_HOLE / STATE_ZERO of base:allocation (NBD spec, "base:allocation").
_NBD_STATE_HOLE = 1
_NBD_STATE_ZERO = 2
# Largest single request we send: well under every server's 32 MiB maximum.
MAX_REQUEST = 4 << 20
# block status queries: a hint, kept below the 4 GiB that some servers refuse.
_MAX_STATUS = 1 << 30


def is_nbd_uri(target: str) -> bool:
    return target.startswith(NBD_SCHEMES)


class Source(ABC):
    """A read-only byte range ``[0, size)`` with an allocation map."""

    name: str
    size: int
    format: str  # "raw" for files and NBD exports; the image format for qemu-opened images
    backup: str | None = None  # the backup point read, for a backup directory

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (zero-filled past the end is not allowed)."""

    @abstractmethod
    def _extents_at(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least ``offset``, never running past ``offset + length``."""

    def pread_into(self, offset: int, buf: bytearray | memoryview, length: int) -> None:
        """Read ``length`` bytes at ``offset`` into the start of ``buf``."""
        buf[:length] = self.pread(offset, length)

    def close(self) -> None:
        return None

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, Extent]]:
        """(offset, extent) runs covering ``[offset, offset+length)`` exactly, merged."""
        end = self.size if length is None else min(self.size, offset + length)
        pending: tuple[int, Extent] | None = None
        pos = offset
        while pos < end:
            got = self._extents_at(pos, end - pos)
            if not got or got[0].length <= 0:
                raise DeviceError(f"{self.name}: no allocation status at offset {pos}")
            for ext in got:
                n = min(ext.length, end - pos)
                if n <= 0:
                    break
                if pending and (pending[1].hole, pending[1].zero) == (ext.hole, ext.zero):
                    pending = (pending[0], Extent(pending[1].length + n, ext.hole, ext.zero))
                else:
                    if pending:
                        yield pending
                    pending = (pos, Extent(n, ext.hole, ext.zero))
                pos += n
        if pending:
            yield pending

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FileSource(Source):
    """A raw image file or block device, read with ``os.pread``."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.format = "raw"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"cannot open {path}: {err.strerror}") from None
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self._fd)
            raise UsageError(f"{path} is a directory, not an image")
        self.size = os.lseek(self._fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        self._seek_works = True

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"{self.name}: read {offset}+{length} beyond the end ({self.size})")
        data = os.pread(self._fd, length, offset)
        while len(data) < length:  # short reads: only on odd files, loop until done
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                raise DeviceError(f"{self.name}: unexpected end of file at {offset + len(data)}")
            data += more
        return data

    def pread_into(self, offset: int, buf: bytearray | memoryview, length: int) -> None:
        """Straight into ``buf`` (no new pages to fault in, unlike a fresh ``bytes``)."""
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"{self.name}: read {offset}+{length} beyond the end ({self.size})")
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(self._fd, [view[done:length]], offset + done)
            if n <= 0:
                raise DeviceError(f"{self.name}: unexpected end of file at {offset + done}")
            done += n

    def _extents_at(self, offset: int, length: int) -> list[Extent]:
        if self._seek_works:
            try:
                _, n, is_data = next(data_runs(self._fd, offset, length))
            except OSError:
                self._seek_works = False  # EINVAL: filesystem without SEEK_DATA
            else:
                return [Extent(n, not is_data, not is_data)]
        return [Extent(length, False, False)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NbdSource(Source):
    """An NBD export read through libnbd, allocation from ``base:allocation``."""

    def __init__(self, uri: str, format: str = "raw") -> None:
        self.name = uri
        self.format = format
        self._h = nbd.NBD()
        self._h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            self._h.connect_uri(uri)
        except nbd.Error as err:
            raise UsageError(f"cannot connect to {uri}: {err.string}") from None
        self.size = int(self._h.get_size())
        self._status = bool(self._h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"{self.name}: read {offset}+{length} beyond the end ({self.size})")
        parts: list[bytes] = []
        pos = offset
        try:
            while pos < offset + length:
                n = min(MAX_REQUEST, offset + length - pos)
                parts.append(self._h.pread(n, pos))
                pos += n
        except nbd.Error as err:
            raise DeviceError(f"{self.name}: read at {pos} failed: {err.string}") from None
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)  # libnbd: bytearray

    def pread_into(self, offset: int, buf: bytearray | memoryview, length: int) -> None:
        """One copy fewer than ``pread``: libnbd's bytearray goes straight into ``buf``."""
        if length > MAX_REQUEST:
            super().pread_into(offset, buf, length)
            return
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"{self.name}: read {offset}+{length} beyond the end ({self.size})")
        try:
            buf[:length] = self._h.pread(length, offset)
        except nbd.Error as err:
            raise DeviceError(f"{self.name}: read at {offset} failed: {err.string}") from None

    def _extents_at(self, offset: int, length: int) -> list[Extent]:
        if not self._status:
            return [Extent(length, False, False)]
        found: list[Extent] = []

        def collect(metacontext: str, off: int, entries: list[int], err: Any) -> int:
            if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            for i in range(0, len(entries) - 1, 2):
                flags = entries[i + 1]
                found.append(
                    Extent(entries[i], bool(flags & _NBD_STATE_HOLE), bool(flags & _NBD_STATE_ZERO))
                )
            return 0

        try:
            self._h.block_status(min(length, _MAX_STATUS), offset, collect)
        except nbd.Error as err:
            raise DeviceError(
                f"{self.name}: block status at {offset} failed: {err.string}"
            ) from None
        return found

    def close(self) -> None:
        h = getattr(self, "_h", None)
        if h is not None:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
            self._h = None
