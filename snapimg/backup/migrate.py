"""Convert a version-1 backup directory (raw and ``.inc`` files) to qcow2 points.

``backup`` and ``prune`` do this first when they find a version-1 manifest (under the
directory lock).  Each point becomes ``<id>.qcow2``, written by QEMU: a full one by
``qemu-img convert`` of its sparse raw file, an incremental one as a qcow2 overlay of its
parent's new file into which the ``.inc`` file's data ranges are written and its zero
ranges zeroed (through a qemu-storage-daemon export, as a backup writes).  Every new point
is then read back through QEMU, its piece digests computed and its whole-image SHA-256
checked against the version-1 manifest: a point that does not match stops the
conversion and nothing changes.  Only then is the version-2 manifest written (atomically)
and the old files removed.  Killed half-way, the old manifest and files are untouched and
the next run starts again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from snapimg.backup import incfile, manifest, piecefile, points, qemuimg
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.backup.nbdread import NbdReader
from snapimg.backup.pipeline import NbdSink, plan_jobs, run_pipeline
from snapimg.backup.ranges import piece_regions
from snapimg.errors import BackupError
from snapimg.fileio import fsync_dir, fsync_path
from snapimg.progress import Progress
from snapimg.qemuexport import QemuExport

Range = tuple[int, int]


def migrate(directory: Path, man: Manifest, progress: bool = False) -> Manifest:
    """Convert every point of a version-1 ``man``; returns the version-2 manifest."""
    if not man.legacy:
        return man
    new: list[BackupRecord] = []
    for rec in man.backups:
        new.append(_convert(directory, rec, man, progress))
    out = Manifest(new)
    manifest.save(directory, out)
    for rec in man.backups:
        with contextlib.suppress(FileNotFoundError):
            (directory / rec.file).unlink()
    fsync_dir(directory)
    return out


def _convert(directory: Path, rec: BackupRecord, man: Manifest, progress: bool) -> BackupRecord:
    final = directory / f"{rec.id}.qcow2"
    tmp = directory / f".{rec.id}.qcow2.tmp"
    source = directory / rec.file
    if not source.is_file():
        raise BackupError(
            f"cannot convert {directory}: file {rec.file} of backup {rec.id} is missing"
        )
    try:
        if rec.parent is None:
            qemuimg.run("convert", "-q", "-f", "raw", "-O", "qcow2", str(source), str(tmp))
        else:
            parent = man.get(rec.parent)
            qemuimg.create_qcow2(tmp, rec.size, f"{parent.id}.qcow2")
            _apply_incremental(source, tmp, rec.size)
        fsync_path(tmp)
        with QemuExport(tmp, "qcow2") as exp, NbdReader(exp.uri) as reader:
            bar = Progress(f"convert {rec.id}", rec.size, enabled=progress)
            result = points.scan(reader, whole_sha256=True, progress=bar)
            bar.finish()
        if result.sha256 != rec.sha256:
            raise BackupError(
                f"cannot convert {directory}: backup {rec.id} reads as sha256 "
                f"{result.sha256}, the manifest says {rec.sha256} (run "
                f"'snapimg verify {directory}')"
            )
        digests = points.digests_of(rec.size, result)
        piecefile.write(directory / f"{rec.id}.pieces", digests)
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dataclasses.replace(
        rec, file=final.name, digest=digests.image_digest(), pieces=f"{rec.id}.pieces"
    )


def _apply_incremental(inc: Path, target: Path, size: int) -> None:
    """Write an ``.inc`` file's data ranges and zero its zero ranges in ``target``."""
    table = incfile.read_table(inc)
    if table.size != size:
        raise BackupError(f"{inc}: image size {table.size} differs from {size}")
    writes = sorted(table.data + table.zero)
    regions = piece_regions(writes, size)
    data_part = QemuExport(inc, "raw", raw_size=size)  # part 1 only: the image-sized part
    with (
        data_part,
        NbdReader(data_part.uri) as reader,
        QemuExport(target, "qcow2", writable=True, no_flush=True) as out,
    ):
        sink = NbdSink(out.uri, "write")
        try:
            run_pipeline(reader, plan_jobs(reader, regions, writes), sink)
            sink.flush()
        finally:
            sink.close()
        out.close()
