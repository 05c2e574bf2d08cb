"""Backup points of a version-2 directory: their files, exports and piece digests.

A point is read through QEMU: a private qemu-storage-daemon opens ``DIR/<id>.qcow2``
(QEMU follows the backing files of an incremental) and exports it over NBD; the pipeline
hashes it from there, skipping what block status reports as zeroes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from snapimg.backup import piecefile
from snapimg.backup.manifest import BackupRecord
from snapimg.backup.nbdread import NbdReader
from snapimg.backup.pipeline import PipelineResult, plan_jobs, run_pipeline
from snapimg.digest import PieceDigests
from snapimg.errors import BackupError
from snapimg.progress import Progress
from snapimg.qemuexport import QemuExport

Range = tuple[int, int]


def file_of(directory: Path, rec: BackupRecord) -> Path:
    path = directory / rec.file
    if not path.is_file():
        raise BackupError(f"broken chain: file {rec.file} of backup {rec.id} is missing")
    return path


@contextlib.contextmanager
def opened(
    directory: Path, rec: BackupRecord, *, allocation_depth: bool = False, connections: int = 4
) -> Iterator[NbdReader]:
    """Point ``rec`` exported read-only by QEMU, as an :class:`NbdReader`."""
    path = file_of(directory, rec)
    with (
        QemuExport(path, "qcow2", allocation_depth=allocation_depth) as exp,
        NbdReader(exp.uri, connections, allocation_depth=allocation_depth) as reader,
    ):
        if reader.size != rec.size:
            raise BackupError(
                f"backup {rec.id}: {rec.file} is {reader.size} bytes, the manifest says {rec.size}"
            )
        yield reader


def digests_of(size: int, result: PipelineResult, base: PieceDigests | None = None) -> PieceDigests:
    """``base`` (or an all-zero image) with the pieces ``result`` visited replaced."""
    out = base.copy() if base is not None else PieceDigests(size)
    for index, count in result.zero_spans:
        out.clear(index, count)
    out.update(result.digests)
    return out


def scan(
    reader: NbdReader,
    regions: list[Range] | None = None,
    *,
    whole_sha256: bool = False,
    progress: Progress | None = None,
) -> PipelineResult:
    """Hash ``regions`` (piece-aligned; None: the whole image) of an export."""
    jobs = plan_jobs(reader, regions if regions is not None else [(0, reader.size)])
    return run_pipeline(reader, jobs, None, whole_sha256=whole_sha256, progress=progress)


def stored_pieces(directory: Path, rec: BackupRecord) -> PieceDigests:
    """The piece digests stored for ``rec``, checked against its size and digest."""
    if rec.pieces is None:
        raise BackupError(f"backup {rec.id} has no piece digest file")
    pieces = piecefile.read(directory / rec.pieces)
    if pieces.size != rec.size:
        raise BackupError(f"{rec.pieces}: image size {pieces.size}, the manifest says {rec.size}")
    if pieces.image_digest() != rec.digest:
        raise BackupError(f"{rec.pieces} does not match the digest of backup {rec.id}")
    return pieces


def piece_digests(directory: Path, rec: BackupRecord) -> PieceDigests:
    """The piece digests of ``rec``: stored, or recomputed from its file when the piece
    digest file is missing or damaged (then they must give the recorded digest)."""
    try:
        return stored_pieces(directory, rec)
    except BackupError:
        pass
    with opened(directory, rec) as reader:
        pieces = digests_of(rec.size, scan(reader))
    if pieces.image_digest() != rec.digest:
        raise BackupError(f"backup {rec.id} does not match its digest: run 'snapimg verify'")
    piecefile.write(directory / (rec.pieces or f"{rec.id}.pieces"), pieces)
    return pieces
