"""One backup: snapshot -> qcow2 point written by QEMU -> piece digests -> manifest -> drop.

A full backup is ``DIR/<id>.qcow2`` without a backing file; an incremental one has its
parent's file as backing file (relative name, format qcow2) and holds the changed ranges:
data where the snapshot has data, zero clusters where it reads as zero (so they hide the
parent's data).  The qcow2 file is created by ``qemu-img`` and written over NBD through a
private qemu-storage-daemon: snapimg never writes qcow2 itself.

Order of an incremental ``--since S``: the new snapshot N is created first, then the
changed ranges of S are fetched.  S preserved exactly the blocks written between S and N
up to N's creation, and anything written after N only adds ranges, so the list is a
superset of what changed between S and N; copying a superset from N is exact.  The
pieces those ranges touch are read whole from N and hashed again; all other piece digests
are the parent's.

Crash safety: the qcow2 and piece files are written under dot-names and renamed once
complete and fsynced; the manifest is replaced atomically after that.  DIR/.pending.json
names the snapshot while it exists; a later run that finds the file (the earlier one was
killed) drops that snapshot, and removes temporary files and the files of a point that
was never added to the manifest.  A snapshot named by ``--keep`` is kept only when the
backup completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapimg.backup import manifest, piecefile, points, qemuimg
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.backup.nbdread import NbdReader
from snapimg.backup.pipeline import NbdSink, PipelineResult, plan_jobs, run_pipeline
from snapimg.backup.ranges import count_blocks, merge_ranges, piece_regions
from snapimg.backup.sources import SnapshotSource
from snapimg.digest import PIECE_SIZE, PieceDigests
from snapimg.errors import BackupError, SnapimgError, UsageError
from snapimg.fileio import fsync_dir, fsync_path
from snapimg.progress import Progress
from snapimg.qemuexport import QemuExport

PENDING_NAME = ".pending.json"
# what a killed first backup may leave in a directory that has no manifest yet
_LEFTOVER = re.compile(r"\.lock|\.pending\.json|\..*\.tmp|b\d{4,}\.(qcow2|pieces)")
Range = tuple[int, int]


@dataclass
class BackupResult:
    record: BackupRecord
    copy: PipelineResult
    changed_blocks: int
    pieces_hashed: int
    duration: float
    dropped: bool
    notice: str | None = None
    copy_duration: float = 0.0  # reading, writing and hashing the pieces
    verify_duration: float = 0.0  # --sha256: reading the new point back through QEMU

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        mib_s = self.copy.bytes_read / (1 << 20) / self.duration if self.duration > 0 else 0.0
        return {
            "id": rec.id,
            "parent": rec.parent,
            "kind": rec.kind,
            "snapshot": rec.snapshot,
            "snapshot_kept": rec.snapshot_kept,
            "file": rec.file,
            "size": rec.size,
            "bytes_read": self.copy.bytes_read,
            "bytes_written": rec.bytes_written,
            "bytes_skipped": self.copy.bytes_skipped,
            "changed_blocks": self.changed_blocks,
            "block_size": rec.block_size,
            "pieces_hashed": self.pieces_hashed,
            "duration": round(self.duration, 3),
            "mib_per_s": round(mib_s, 1),
            "copy_duration": round(self.copy_duration, 3),
            "verify_duration": round(self.verify_duration, 3),
            "digest": rec.digest,
            "sha256": rec.sha256,
            "notice": self.notice,
        }


@contextlib.contextmanager
def writable_directory(directory: Path) -> Iterator[None]:
    """Lock ``directory`` for a writer, creating it if needed; a directory this call
    created is removed again when nothing was added to it."""
    created = False
    if not directory.exists():
        if not directory.parent.is_dir():
            raise UsageError(f"--to {directory}: no such parent directory")
        directory.mkdir()
        created = True
    elif not directory.is_dir():
        raise UsageError(f"--to {directory} is not a directory")
    elif not (directory / manifest.MANIFEST_NAME).exists() and any(
        not _LEFTOVER.fullmatch(p.name) for p in directory.iterdir()
    ):
        raise UsageError(
            f"--to {directory} is not a backup directory (no manifest.json) and is not empty"
        )
    try:
        with manifest.locked(directory):
            yield
    finally:
        if created and not any(directory.iterdir()):
            with contextlib.suppress(OSError):
                directory.rmdir()


def run_backup(
    source: SnapshotSource,
    origin: str,
    directory: Path,
    *,
    since: str | None,
    keep: str | None,
    sha256: bool = False,
    progress: bool = False,
) -> BackupResult:
    """Back up ``origin`` of ``source`` into ``directory`` (see module doc)."""
    notices = []
    if since is not None and not source.supports_incremental:
        notices.append(
            f"this source cannot list the blocks changed since {origin}@{since}: "
            f"taking a full backup instead of an incremental"
        )
        since = None
    with writable_directory(directory):
        man = manifest.load(directory)
        if man.legacy:
            from snapimg.backup.migrate import migrate

            man = migrate(directory, man, progress=progress)
            notices.append(
                f"converted {directory} from the version-1 format (raw and .inc "
                f"files) to qcow2 points"
            )
        _recover(source, directory, man)
        parent: BackupRecord | None = None
        if since is not None:
            parent = man.latest_of_snapshot(f"{origin}@{since}")
            if parent is None:
                raise BackupError(
                    f"no backup in {directory} was taken from {origin}@{since}; "
                    f"take a full backup with --keep {origin}@{since} first"
                )
        backup_id = man.next_id()
        snap = keep if keep is not None else f"backup-{backup_id}-{secrets.token_hex(3)}"
        t0 = time.monotonic()
        _write_pending(directory, {"origin": origin, "snapshot": snap, "pid": os.getpid()})
        created = completed = dropped = False
        try:
            try:
                uri, block_size = source.create(origin, snap)
                created = True
            except SnapimgError:
                raise  # refused by the server: nothing was created
            except BaseException:
                created = True  # interrupted while asking: it may exist, drop it
                raise
            work = _Work(
                source,
                directory,
                man,
                backup_id,
                origin,
                snap,
                keep is not None,
                since,
                parent,
                sha256,
                progress,
            )
            result = work.run(uri, block_size)
            completed = True
        finally:
            if created and not (completed and keep is not None):
                dropped = source.drop(origin, snap)
            _clear_pending(directory)
        result.duration = time.monotonic() - t0
        result.dropped = dropped
        result.notice = "; ".join(notices) or None
        return result


class _Work:
    """The copy of one snapshot into a new point (after the snapshot exists)."""

    def __init__(
        self,
        source: SnapshotSource,
        directory: Path,
        man: Manifest,
        backup_id: str,
        origin: str,
        snap: str,
        kept: bool,
        since: str | None,
        parent: BackupRecord | None,
        sha256: bool,
        progress: bool,
    ) -> None:
        self.source = source
        self.directory = directory
        self.man = man
        self.id = backup_id
        self.origin = origin
        self.snap = snap
        self.kept = kept
        self.since = since
        self.parent = parent
        self.sha256 = sha256
        self.progress = progress
        self.file = f"{backup_id}.qcow2"
        self.pieces_file = f"{backup_id}.pieces"
        self.tmp = directory / f".{self.file}.tmp"

    def run(self, uri: str, block_size: int) -> BackupResult:
        with NbdReader(uri) as reader:
            size = reader.size
            parent = self.parent
            if parent is not None and parent.size != size:
                raise BackupError(
                    f"{self.origin} is {size} bytes now, backup {parent.id} has "
                    f"{parent.size}: take a full backup"
                )
            if parent is not None and self.since is not None:
                changed = merge_ranges(self.source.changed_ranges(self.origin, self.since), size)
                regions = piece_regions(changed, size)
                base: PieceDigests | None = points.piece_digests(self.directory, parent)
            else:
                changed = regions = [(0, size)] if size else []
                base = None
            try:
                qemuimg.create_qcow2(self.tmp, size, parent.file if parent else None)
                t0 = time.monotonic()
                copied = self._copy(reader, regions, None if parent is None else changed)
                t1 = time.monotonic()
                digests = points.digests_of(size, copied, base)
                whole = self._read_back(digests) if self.sha256 else None
                t2 = time.monotonic()
                record = BackupRecord(
                    id=self.id,
                    parent=parent.id if parent else None,
                    kind="full" if parent is None else "incremental",
                    origin=self.origin,
                    snapshot=f"{self.origin}@{self.snap}",
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    file=self.file,
                    size=size,
                    block_size=block_size,
                    bytes_written=copied.bytes_written,
                    digest=digests.image_digest(),
                    pieces=self.pieces_file,
                    sha256=whole,
                    snapshot_kept=self.kept,
                )
                self._publish(digests, record)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.tmp.unlink()
                raise
        if parent is not None:
            changed_blocks = count_blocks(changed, block_size)
        else:  # blocks holding data
            changed_blocks = -(-copied.bytes_written // max(block_size, 1))
        return BackupResult(
            record,
            copied,
            changed_blocks,
            len(copied.digests),
            0.0,
            False,
            copy_duration=t1 - t0,
            verify_duration=t2 - t1,
        )

    def _copy(
        self, reader: NbdReader, regions: list[Range], writes: list[Range] | None
    ) -> PipelineResult:
        """Copy into the new qcow2 through QEMU; the piece digests of ``regions``."""
        total = sum(n for _, n in regions)
        bar = Progress(f"backup {self.id}", total, enabled=self.progress)
        with QemuExport(self.tmp, "qcow2", writable=True, no_flush=True) as exp:
            sink = NbdSink(exp.uri, "skip" if writes is None else "write")
            try:
                result = run_pipeline(
                    reader, plan_jobs(reader, regions, writes), sink, progress=bar
                )
                sink.flush()
            finally:
                sink.close()
            exp.close()  # QEMU writes back its metadata and closes the file
        bar.finish()
        fsync_path(self.tmp)
        return result

    def _read_back(self, digests: PieceDigests) -> str:
        """--sha256: read the new point back through QEMU, check every piece, and hash
        the whole image (that costs the virtual size)."""
        with QemuExport(self.tmp, "qcow2") as exp, NbdReader(exp.uri) as reader:
            bar = Progress(f"sha256 {self.id}", reader.size, enabled=self.progress)
            back = points.scan(reader, whole_sha256=True, progress=bar)
            bar.finish()
        again = points.digests_of(reader.size, back)
        first = again.first_difference(digests)
        if first is not None:
            raise BackupError(
                f"verification failed: the new backup file differs from the "
                f"snapshot in the piece at offset {first * PIECE_SIZE}"
            )
        assert back.sha256 is not None
        return back.sha256

    def _publish(self, digests: PieceDigests, record: BackupRecord) -> None:
        piecefile.write(self.directory / self.pieces_file, digests)
        os.replace(self.tmp, self.directory / self.file)
        fsync_dir(self.directory)
        self.man.backups.append(record)
        manifest.save(self.directory, self.man)


def _write_pending(directory: Path, obj: dict[str, Any]) -> None:
    path = directory / PENDING_NAME
    path.write_text(json.dumps(obj) + "\n")
    fsync_dir(directory)


def _clear_pending(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / PENDING_NAME).unlink()


def _recover(source: SnapshotSource, directory: Path, man: Manifest) -> None:
    """Clean up after a backup that was killed: its temporary files, the files of a point
    it published but did not add to the manifest, and its snapshot (a snapshot that a
    listed backup kept is left alone)."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    next_id = man.next_id()
    for name in (f"{next_id}.qcow2", f"{next_id}.pieces"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    path = directory / PENDING_NAME
    try:
        pending = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        pending = {}
    origin, snap = pending.get("origin"), pending.get("snapshot")
    if isinstance(origin, str) and isinstance(snap, str):
        kept = any(r.snapshot == f"{origin}@{snap}" and r.snapshot_kept for r in man.backups)
        if not kept:
            source.drop(origin, snap)  # fails harmlessly if it is gone already
    _clear_pending(directory)
