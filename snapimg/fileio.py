"""File helpers for backups: fsync of files and directories, atomic publishing, holes."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path


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
