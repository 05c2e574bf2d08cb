"""File helpers for backups: atomic publishing, holes, sparse-aware reads."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

ZERO_CHUNK = bytes(8 << 20)
_ZERO = memoryview(ZERO_CHUNK)


def hash_zeroes(h: hashlib._Hash, length: int) -> None:
    """Feed ``length`` zero bytes into ``h``."""
    while length > 0:
        n = min(length, len(_ZERO))
        h.update(_ZERO[:n])
        length -= n


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(fd: int, tmp: Path, final: Path) -> None:
    """fsync ``fd`` (open on ``tmp``), rename ``tmp`` to ``final``, fsync the directory."""
    os.fsync(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeroes, freeing space where the FS can."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    done = 0
    while done < length:
        n = min(length - done, len(ZERO_CHUNK))
        os.pwrite(fd, memoryview(ZERO_CHUNK)[:n], offset + done)
        done += n


def extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering [offset, offset+length) by SEEK_DATA/HOLE."""
    end = offset + length
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            data = end  # no data after pos
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, False
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole - pos, True
        pos = hole


def read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read at {offset}: {len(data)} of {length} bytes")
    return data


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy the data (not the holes) of [offset, offset+length) of ``src`` to the same
    offset of ``dst``; returns the bytes copied."""
    total = 0
    for off, n, is_data in extents(src, offset, length):
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
