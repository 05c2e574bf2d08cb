"""Version-1 backup directories: the image as of a backup, a raw full backup plus the
``.inc`` incrementals leading to it.

:func:`resolve` walks ``parent`` links from a backup to its full backup and refuses a
broken chain (missing record or file, size mismatch, loop).  :func:`image_map` turns the
chain into :class:`Segment` runs saying, for every byte of the image, which backup file
holds it (or that it is zero).  The map is then hashed (:func:`hash_segments`) or written
out (:func:`materialize`) without reading any byte twice.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from snapimg.backup import incfile
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.digest import hash_zeroes
from snapimg.errors import BackupError
from snapimg.fileio import copy_range, data_runs
from snapimg.progress import Progress

READ_CHUNK = 8 << 20


class Segment(NamedTuple):
    offset: int
    length: int
    path: Path | None  # None: zeroes


def resolve(directory: Path, manifest: Manifest, backup_id: str) -> list[BackupRecord]:
    """The chain ending at ``backup_id``, full backup first; raises on a broken chain."""
    rec = manifest.find(backup_id)
    if rec is None:
        raise BackupError(f"no backup {backup_id!r} in {directory / 'manifest.json'}")
    out = [rec]
    seen = {rec.id}
    while rec.parent is not None:
        parent = manifest.find(rec.parent)
        if parent is None:
            raise BackupError(
                f"broken chain: backup {rec.id} needs parent {rec.parent}, "
                f"which is not in the manifest"
            )
        if parent.id in seen:
            raise BackupError(f"broken chain: backup {rec.id} loops back to {parent.id}")
        if parent.size != rec.size:
            raise BackupError(
                f"broken chain: backup {rec.id} ({rec.size} bytes) and its "
                f"parent {parent.id} ({parent.size} bytes) differ in size"
            )
        seen.add(parent.id)
        out.append(parent)
        rec = parent
    out.reverse()
    for r in out:
        if not (directory / r.file).is_file():
            raise BackupError(f"broken chain: file {r.file} of backup {r.id} is missing")
    return out


def overlay(
    base: list[Segment], overrides: Iterable[tuple[int, int, bool]], path: Path, size: int
) -> list[Segment]:
    """``base`` with each (offset, length, is_data) override taken from ``path`` or zero."""
    out: list[Segment] = []
    i = 0
    pos = 0

    def take_base(upto: int) -> None:
        nonlocal i, pos
        while pos < upto:
            seg = base[i]
            end = seg.offset + seg.length
            if end <= pos:
                i += 1
                continue
            stop = min(end, upto)
            _append(out, Segment(pos, stop - pos, seg.path))
            pos = stop

    for off, length, is_data in overrides:
        if off < pos:
            raise BackupError(f"{path}: overlapping or unsorted ranges at {off}")
        take_base(off)
        _append(out, Segment(off, length, path if is_data else None))
        pos = off + length
    take_base(size)
    return out


def _append(out: list[Segment], seg: Segment) -> None:
    if out and out[-1].path == seg.path and out[-1].offset + out[-1].length == seg.offset:
        last = out[-1]
        out[-1] = Segment(last.offset, last.length + seg.length, last.path)
    else:
        out.append(seg)


def image_map(directory: Path, records: list[BackupRecord]) -> list[Segment]:
    full = records[0]
    size = full.size
    segments = [Segment(0, size, directory / full.file)]
    for rec in records[1:]:
        path = directory / rec.file
        table = incfile.read_table(path)
        if table.size != size:
            raise BackupError(f"{path}: image size {table.size} differs from {size}")
        segments = overlay(segments, table.overrides(), path, size)
    return segments


def hash_segments(segments: list[Segment], progress: Progress | None = None) -> str:
    """sha256 of the image the segments describe (holes hashed as zeroes)."""
    sha = hashlib.sha256()
    buf = bytearray(READ_CHUNK)

    def zeroes(n: int) -> None:
        while n > 0:
            k = min(n, 8 * READ_CHUNK)
            hash_zeroes(sha, k)
            if progress is not None:
                progress.add(k)
            n -= k

    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for seg in segments:
            if seg.path is None:
                zeroes(seg.length)
                continue
            if seg.path not in fds:
                fd = os.open(seg.path, os.O_RDONLY)
                stack.callback(os.close, fd)
                fds[seg.path] = fd
            fd = fds[seg.path]
            for off, n, is_data in data_runs(fd, seg.offset, seg.length):
                if not is_data:
                    zeroes(n)
                    continue
                done = 0
                while done < n:
                    view = memoryview(buf)[: min(n - done, READ_CHUNK)]
                    if os.preadv(fd, [view], off + done) != len(view):
                        raise BackupError(f"{seg.path}: short read at {off + done}")
                    sha.update(view)
                    done += len(view)
                    if progress is not None:
                        progress.add(len(view))
    return sha.hexdigest()


def materialize(segments: list[Segment], dst: int) -> int:
    """Copy the data of every segment into ``dst`` (a fresh sparse file of the full size);
    returns the bytes copied (data only: zero runs stay holes)."""
    copied = 0
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for seg in segments:
            if seg.path is None:
                continue
            if seg.path not in fds:
                fd = os.open(seg.path, os.O_RDONLY)
                stack.callback(os.close, fd)
                fds[seg.path] = fd
            copied += copy_range(fds[seg.path], dst, seg.offset, seg.length)
    return copied
