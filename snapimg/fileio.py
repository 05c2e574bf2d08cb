"""File helpers every layer shares (engine, backup, inspect): durability (fsync of files
and directories, atomic publishing) and sparse files (fallocate(2) with a mode, making a
range read as zeroes, the data and hole runs of a file, copying only the data).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZEROS = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# -- durability ----------------------------------------------------------------------------


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fsync_path(directory, directory=True)


def publish(fd: int, tmp: Path, final: Path) -> None:
    """fsync ``fd`` (open on ``tmp``), rename ``tmp`` to ``final``, fsync the directory."""
    os.fsync(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


# -- sparse files --------------------------------------------------------------------------


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_zeroes_fd(fd: int, offset: int, length: int, punch: bool) -> None:
    """Make [offset, offset+length) of a regular file read as zeroes: a hole punched
    (``punch``) or a zeroed range, else zeroes written where the file system can do
    neither."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if punch else FALLOC_FL_ZERO_RANGE
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - offset)], offset)
        offset += n


def data_runs(fd: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering [offset, offset+length) of a file, from
    SEEK_DATA / SEEK_HOLE; no data after a position (ENXIO, past the end of the file too)
    is a hole.  Other errors (a file system that cannot say) raise OSError."""
    end = offset + length
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, False
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        if hole > pos:  # else a write filled the hole meanwhile: look again
            yield pos, hole - pos, True
            pos = hole


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy the data (not the holes) of [offset, offset+length) of ``src`` to the same
    offset of ``dst``; returns the bytes copied."""
    total = 0
    for off, n, is_data in data_runs(src, offset, length):
        if not is_data:
            continue
        done = 0
        while done < n:
            o = off + done
            copied = os.copy_file_range(src, dst, n - done, o, o)
            if copied <= 0:
                raise OSError(errno.EIO, f"copy_file_range stopped at {o}")
            done += copied
        total += n
    return total
