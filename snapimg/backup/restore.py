"""Rebuild the raw image as of a backup (full + incrementals) and verify its sha256.

The image is written under a temporary name next to IMAGE (sparse: zero runs stay holes),
fsynced, hashed as written, compared with the manifest's sha256 and only then renamed to
IMAGE.  A broken chain or a mismatch leaves IMAGE untouched.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from snapimg.backup import chain, manifest
from snapimg.backup.fileio import publish
from snapimg.errors import BackupError
from snapimg.progress import Progress


@dataclass
class RestoreResult:
    backup: str
    chain: list[str]
    image: str
    size: int
    bytes_written: int
    sha256: str
    duration: float

    def to_json(self) -> dict[str, object]:
        mib_s = self.size / (1 << 20) / self.duration if self.duration > 0 else 0.0
        return {"backup": self.backup, "chain": self.chain, "image": self.image,
                "size": self.size, "bytes_written": self.bytes_written,
                "sha256": self.sha256, "duration": round(self.duration, 3),
                "mib_per_s": round(mib_s, 1)}


def restore(directory: Path, backup_id: str | None, image: Path,
            progress: bool | None = None) -> RestoreResult:
    t0 = time.monotonic()
    if not directory.is_dir():
        raise BackupError(f"{directory} is not a backup directory (no such directory)")
    man = manifest.load(directory)
    if not man.backups:
        raise BackupError(f"{directory} holds no backups")
    rec_id = backup_id if backup_id is not None else man.backups[-1].id
    records = chain.resolve(directory, man, rec_id)
    segments = chain.image_map(directory, records)
    target = records[-1]
    if image.exists() and not stat.S_ISREG(image.stat().st_mode):
        raise BackupError(f"{image} exists and is not a regular file")
    if not image.parent.is_dir():
        raise BackupError(f"directory {image.parent} does not exist")
    tmp = image.parent / f".{image.name}.restore-tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, target.size)
        written = chain.materialize(segments, fd)
        os.fsync(fd)
        bar = Progress(f"verify {target.id}", target.size, enabled=progress)
        digest = chain.hash_segments([chain.Segment(0, target.size, tmp)], bar)
        bar.finish()
        if digest != target.sha256:
            raise BackupError(f"restore of backup {target.id}: sha256 {digest} does not "
                              f"match the manifest's {target.sha256}")
        publish(fd, tmp, image)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return RestoreResult(target.id, [r.id for r in records], str(image), target.size,
                         written, digest, time.monotonic() - t0)
