"""Reflinks: whether a file system clones file ranges, and what FIEMAP says of a file.

The compiled data path clones an origin's blocks into the store (FICLONERANGE) where
both share a file system that can (XFS with ``reflink=1``, btrfs): :func:`clones` asks
the file system once, at open, with two unnamed files in the store's directory.
:func:`file_extents` reads a file's extent map (FS_IOC_FIEMAP, as ``filefrag -v``): which
extents are shared with other files, and how fragmented a file has become (each cloned
and then overwritten origin block is a new extent of the origin; docs/store-format.md).
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000

_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_BATCH = 256  # extents per ioctl


def clones(directory: Path) -> bool:
    """Whether the file system holding ``directory`` clones file ranges (FICLONE of one
    written block between two unnamed files; nothing is left behind)."""
    try:
        with (
            tempfile.TemporaryFile(dir=directory) as src,
            tempfile.TemporaryFile(dir=directory) as dst,
        ):
            os.pwrite(src.fileno(), bytes(4096), 0)
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class FileExtent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        """The extent's blocks are also another file's (a reflink)."""
        return bool(self.flags & FIEMAP_EXTENT_SHARED)

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


def file_extents(fd: int, start: int = 0, length: int | None = None) -> list[FileExtent]:
    """The extents of ``fd`` overlapping [start, start+length) (default: to the end),
    after writing back its dirty pages (so delayed allocations have their places).
    Raises OSError (EOPNOTSUPP where the file system has no FIEMAP)."""
    end = os.fstat(fd).st_size if length is None else start + length
    out: list[FileExtent] = []
    pos = start
    while pos < end:
        req = bytearray(_FIEMAP.size + _BATCH * _EXTENT.size)
        _FIEMAP.pack_into(req, 0, pos, end - pos, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
        mapped = _FIEMAP.unpack_from(req)[3]
        if not mapped:
            break
        for i in range(mapped):
            ext = FileExtent(*_EXTENT.unpack_from(req, _FIEMAP.size + i * _EXTENT.size))
            out.append(ext)
        last = out[-1]
        if last.flags & FIEMAP_EXTENT_LAST:
            break
        pos = last.logical + last.length
    return out
