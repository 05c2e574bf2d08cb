"""A backup point as a :class:`~snapimg.inspect.source.Source`: ``DIR`` or ``DIR --backup ID``.

A version-2 point is its qcow2 file, read through QEMU (which follows the backing files of
an incremental).  A version-1 point is assembled from its raw and ``.inc`` files with the
same map that restore uses, read in place: no temporary copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapimg.backup import chain, manifest
from snapimg.backup.manifest import BackupRecord
from snapimg.blockdev import Extent
from snapimg.errors import BackupError, DeviceError, UsageError
from snapimg.fileio import data_runs
from snapimg.inspect.qemu_image import QemuImageSource
from snapimg.inspect.source import Source


def is_backup_dir(path: Path) -> bool:
    return path.is_dir() and (path / manifest.MANIFEST_NAME).is_file()


def open_point(directory: Path, backup_id: str | None) -> Source:
    """The image of backup point ``backup_id`` (default: the newest) of ``directory``."""
    if not is_backup_dir(directory):
        raise UsageError(f"--backup: {directory} is not a backup directory (no manifest.json)")
    man = manifest.load(directory)
    rec = man.point(backup_id)
    src: Source
    if man.legacy:
        records = chain.resolve(directory, man, rec.id)
        src = LegacyPointSource(str(directory), rec, chain.image_map(directory, records))
    else:
        path = directory / rec.file
        if not path.is_file():
            raise BackupError(f"broken chain: file {rec.file} of backup {rec.id} is missing")
        src = QemuImageSource(path, "qcow2", name=str(directory))
    src.backup = rec.id
    return src


class LegacyPointSource(Source):
    """A version-1 point: segments of a raw full backup and ``.inc`` files, or zeroes."""

    def __init__(self, name: str, rec: BackupRecord, segments: list[chain.Segment]) -> None:
        self.name = name
        self.format = "raw"
        self.size = rec.size
        self._segments = segments
        self._fds: dict[Path, int] = {}
        try:
            for seg in segments:
                if seg.path is not None and seg.path not in self._fds:
                    self._fds[seg.path] = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            self.close()
            raise BackupError(f"cannot open {err.filename}: {err.strerror}") from None

    def _segment(self, offset: int) -> chain.Segment:
        lo, hi = 0, len(self._segments)
        while lo < hi:  # the last segment starting at or before offset
            mid = (lo + hi) // 2
            if self._segments[mid].offset <= offset:
                lo = mid + 1
            else:
                hi = mid
        return self._segments[lo - 1]

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"{self.name}: read {offset}+{length} beyond the end ({self.size})")
        out = bytearray()
        pos = offset
        while pos < offset + length:
            seg = self._segment(pos)
            n = min(seg.offset + seg.length, offset + length) - pos
            if seg.path is None:
                out += bytes(n)
            else:
                data = os.pread(self._fds[seg.path], n, pos)
                out += data + bytes(n - len(data))  # past the end of a sparse file: zeroes
            pos += n
        return bytes(out)

    def _extents_at(self, offset: int, length: int) -> list[Extent]:
        seg = self._segment(offset)
        n = min(seg.offset + seg.length, offset + length) - offset
        if seg.path is None:
            return [Extent(n, True, True)]
        try:
            _, run, is_data = next(data_runs(self._fds[seg.path], offset, n))
        except OSError:  # the file system cannot say
            return [Extent(n, False, False)]
        return [Extent(run, not is_data, not is_data)]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
