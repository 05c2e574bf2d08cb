"""Restore: the raw image as of a backup point, written sparse and verified as written.

The point's qcow2 file is opened by QEMU (which follows the backing files of an
incremental) and exported to us; holes and zero ranges are skipped by block status, data
is written with ``pwrite`` into a temporary file next to IMAGE and hashed piece by piece
on its way there.  Only when the image digest equals the manifest's ``digest`` is the
file fsynced and renamed to IMAGE.  A version-1 directory is restored from its raw and
``.inc`` files and checked against its whole-image ``sha256``.  A broken chain or a
mismatch leaves IMAGE untouched.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from snapimg.backup import chain, manifest, points
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.backup.pipeline import FileSink, plan_jobs, run_pipeline
from snapimg.digest import PIECE_SIZE
from snapimg.errors import BackupError, UsageError
from snapimg.fileio import publish
from snapimg.imagelock import check_not_in_use
from snapimg.progress import Progress


@dataclass
class RestoreResult:
    backup: str
    chain: list[str]
    image: str
    size: int
    bytes_written: int
    digest: str | None
    sha256: str | None
    duration: float

    def to_json(self) -> dict[str, object]:
        mib_s = self.size / (1 << 20) / self.duration if self.duration > 0 else 0.0
        return {
            "backup": self.backup,
            "chain": self.chain,
            "image": self.image,
            "size": self.size,
            "bytes_written": self.bytes_written,
            "digest": self.digest,
            "sha256": self.sha256,
            "duration": round(self.duration, 3),
            "mib_per_s": round(mib_s, 1),
        }


def prepare_target(image: Path, force: bool) -> Path:
    """Check the file restore is asked to write; the temporary file to write instead.

    The one place where restore looks at its target: an existing IMAGE is replaced only
    with ``force``, only if it is a regular file, and never while a VM, ``snapimg serve``
    or a QEMU tool holds it (QEMU's image locks: :mod:`snapimg.imagelock`).
    """
    if image.exists() or image.is_symlink():
        if not stat.S_ISREG(image.stat().st_mode):
            raise UsageError(f"{image} exists and is not a regular file")
        check_not_in_use(image)
        if not force:
            raise UsageError(f"{image} exists: restore does not overwrite a file without --force")
    if not image.parent.is_dir():
        raise UsageError(f"directory {image.parent} does not exist")
    return image.parent / f".{image.name}.restore-tmp"


def lineage(man: Manifest, rec: BackupRecord) -> list[str]:
    """The ids from the first point of ``rec``'s chain to ``rec``, by the manifest."""
    ids = [rec.id]
    seen = {rec.id}
    cur = rec
    while cur.parent is not None:
        parent = man.find(cur.parent)
        if parent is None or parent.id in seen:
            break
        ids.append(parent.id)
        seen.add(parent.id)
        cur = parent
    ids.reverse()
    return ids


def restore(
    directory: Path,
    backup_id: str | None,
    image: Path,
    *,
    force: bool = False,
    progress: bool = False,
) -> RestoreResult:
    t0 = time.monotonic()
    if not (directory / manifest.MANIFEST_NAME).is_file():
        raise BackupError(f"{directory} is not a backup directory (no manifest.json)")
    man = manifest.load(directory)
    rec = man.point(backup_id)
    tmp = prepare_target(image, force)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, rec.size)
        bar = Progress(f"restore {rec.id}", rec.size, enabled=progress)
        digest: str | None = None
        sha256: str | None
        if man.legacy:
            ids, written, sha256 = _legacy(directory, man, rec, fd, tmp, bar)
        else:
            ids = lineage(man, rec)
            for point in ids:  # a clear line for a missing file before QEMU's
                points.file_of(directory, man.get(point))
            written, digest = _restore_point(directory, rec, fd, bar)
            sha256 = rec.sha256
        bar.finish()
        publish(fd, tmp, image)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return RestoreResult(
        rec.id, ids, str(image), rec.size, written, digest, sha256, time.monotonic() - t0
    )


def _restore_point(directory: Path, rec: BackupRecord, fd: int, bar: Progress) -> tuple[int, str]:
    with points.opened(directory, rec) as reader:
        result = run_pipeline(
            reader, plan_jobs(reader, [(0, rec.size)]), FileSink(fd), progress=bar
        )
    digests = points.digests_of(rec.size, result)
    digest = digests.image_digest()
    if digest != rec.digest:
        where = ""
        with contextlib.suppress(BackupError):
            first = digests.first_difference(points.stored_pieces(directory, rec))
            if first is not None:
                where = f" (first in the piece at offset {first * PIECE_SIZE})"
        raise BackupError(
            f"restore of backup {rec.id}: digest {digest} does not match the "
            f"manifest's {rec.digest}{where}"
        )
    return result.bytes_written, digest


def _legacy(
    directory: Path, man: Manifest, rec: BackupRecord, fd: int, tmp: Path, bar: Progress
) -> tuple[list[str], int, str]:
    """A version-1 point: copy the raw/.inc chain, then check the whole-image sha256."""
    records = chain.resolve(directory, man, rec.id)
    segments = chain.image_map(directory, records)
    written = chain.materialize(segments, fd)
    os.fsync(fd)
    sha256 = chain.hash_segments([chain.Segment(0, rec.size, tmp)], bar)
    if sha256 != rec.sha256:
        raise BackupError(
            f"restore of backup {rec.id}: sha256 {sha256} does not match the "
            f"manifest's {rec.sha256}"
        )
    return [r.id for r in records], written, sha256
