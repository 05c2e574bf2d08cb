"""An origin: a raw image file or block device, with positional I/O and its identity."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from snapimg.blockdev import Extent
from snapimg.errors import UsageError

# engine/store.py imports these two from here: re-exported until it imports snapimg.fileio
from snapimg.fileio import data_runs, write_zeroes_fd

_TAG_XATTR = "user.snapimg.tag"
_ZEROS = bytes(1 << 20)


class Origin:
    """An opened origin.  ``fingerprint`` identifies the file across store reopenings:
    its inode number plus a random tag kept in the ``user.snapimg.tag`` extended
    attribute (block devices: their resolved path)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"cannot open origin {name!r} ({path}): {err.strerror}") from err
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise UsageError(f"origin {name!r} ({path}) is not a regular file or block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        self._ino = st.st_ino

    def same_file(self, other: Origin) -> bool:
        """Whether ``other`` is this very file (by device and inode, whatever its path)."""
        a, b = os.fstat(self.fd), os.fstat(other.fd)
        return (a.st_dev, a.st_ino, a.st_rdev) == (b.st_dev, b.st_ino, b.st_rdev)

    def fingerprint(self, create_tag: bool) -> str:
        if self.is_block:
            return f"blk:{os.path.realpath(self.path)}"
        tag = ""
        try:
            tag = os.getxattr(self.fd, _TAG_XATTR).decode()
        except OSError:
            if create_tag:
                try:
                    tag = uuid.uuid4().hex
                    os.setxattr(self.fd, _TAG_XATTR, tag.encode())
                except OSError:
                    tag = ""  # no xattrs on this file system: the inode alone
        return f"ino:{self._ino};tag:{tag}" if tag else f"ino:{self._ino}"

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length and offset + len(data) < self.size:
            # a short read inside the file: keep reading (rare, signals)
            parts = [data]
            got = len(data)
            while got < length and offset + got < self.size:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def write_zeroes(self, offset: int, length: int, punch: bool) -> None:
        if self.is_block:
            end = offset + length
            while offset < end:
                n = min(len(_ZEROS), end - offset)
                self.pwrite(_ZEROS[:n], offset)
                offset += n
        else:
            write_zeroes_fd(self.fd, offset, length, punch)

    def datasync(self) -> None:
        os.fdatasync(self.fd)

    def extents(self, offset: int, length: int, limit: int = 64) -> list[Extent]:
        """Allocation of [offset, offset+length) from SEEK_DATA / SEEK_HOLE, in at most
        ``limit`` extents (all data where the file system cannot say)."""
        end = min(offset + length, self.size)
        if self.is_block:
            return [Extent(end - offset, False, False)]
        out: list[Extent] = []
        pos = offset
        try:
            for start, n, is_data in data_runs(self.fd, offset, end - offset):
                if len(out) == limit:
                    break
                out.append(Extent(n, not is_data, not is_data))
                pos = start + n
        except OSError:
            return out or [Extent(end - pos, False, False)]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
