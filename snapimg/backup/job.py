"""One backup: snapshot -> copy (full or changed ranges) -> verify -> manifest -> drop.

Order of an incremental ``--since S``: the new snapshot N is created first, then the
changed ranges of S are fetched.  S preserved exactly the blocks written between S and N
up to N's creation, and anything written after N only adds ranges, so the list is a
superset of what changed between S and N; copying a superset from N is exact.

Crash safety: the backup file is written under a dot-name and renamed only after it is
complete, fsynced and verified; the manifest is replaced atomically after that.  Before
the snapshot is created, DIR/.pending.json names it; a later run that finds the file
(the earlier one was killed) drops that snapshot unless it was to be kept, and removes
stale temporary files.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapimg.backup import chain, incfile, manifest
from snapimg.backup.copy import CopyResult, NbdSource, copy_ranges
from snapimg.backup.fileio import fsync_dir, publish
from snapimg.backup.manifest import BackupRecord
from snapimg.backup.sources import SnapshotSource
from snapimg.errors import BackupError, SnapimgError, UsageError
from snapimg.progress import Progress

PENDING_NAME = ".pending.json"


@dataclass
class BackupResult:
    record: BackupRecord
    copy: CopyResult
    changed_blocks: int
    duration: float
    dropped: bool
    notice: str | None = None
    copy_duration: float = 0.0  # reading, writing and read-back verification
    hash_duration: float = 0.0  # incremental: sha256 of the full image, after the copy

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        mib_s = self.copy.bytes_read / (1 << 20) / self.duration if self.duration > 0 else 0.0
        return {
            "id": rec.id, "parent": rec.parent, "kind": rec.kind, "snapshot": rec.snapshot,
            "snapshot_kept": rec.snapshot_kept, "file": rec.file, "size": rec.size,
            "bytes_read": self.copy.bytes_read, "bytes_written": rec.bytes_written,
            "bytes_skipped": self.copy.bytes_skipped,
            "bytes_zero_read": self.copy.bytes_zero_read,
            "changed_blocks": self.changed_blocks, "block_size": rec.block_size,
            "duration": round(self.duration, 3), "mib_per_s": round(mib_s, 1),
            "copy_duration": round(self.copy_duration, 3),
            "hash_duration": round(self.hash_duration, 3),
            "sha256": rec.sha256, "notice": self.notice,
        }


def merge_ranges(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sort, clip to ``size`` and merge overlapping or adjacent ranges."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        end = min(off + n, size)
        if end <= off:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_off + last_n, end) - last_off)
        else:
            out.append((off, end - off))
    return out


def _blocks(ranges: list[tuple[int, int]], block_size: int) -> int:
    bs = max(block_size, 1)
    return sum((off + n + bs - 1) // bs - off // bs for off, n in ranges)


def run_backup(source: SnapshotSource, origin: str, directory: Path, *, since: str | None,
               keep: str | None, progress: bool | None = None) -> BackupResult:
    """Back up ``origin`` of ``source`` into ``directory`` (see module doc)."""
    if not directory.exists():
        if not directory.parent.is_dir():
            raise UsageError(f"--to {directory}: no such parent directory")
        directory.mkdir()
    elif not directory.is_dir():
        raise UsageError(f"--to {directory} is not a directory")
    notice = None
    if since is not None and not source.supports_incremental:
        notice = (f"this source cannot list the blocks changed since {origin}@{since}: "
                  f"taking a full backup instead of an incremental")
        since = None
    with manifest.locked(directory):
        _recover(source, directory)
        man = manifest.load(directory)
        parent: BackupRecord | None = None
        parent_chain: list[BackupRecord] = []
        if since is not None:
            parent = man.latest_of_snapshot(f"{origin}@{since}")
            if parent is None:
                raise BackupError(f"no backup in {directory} was taken from {origin}@{since}; "
                                  f"take a full backup with --keep {origin}@{since} first")
            parent_chain = chain.resolve(directory, man, parent.id)
        backup_id = man.next_id()
        snap = keep if keep is not None else f"backup-{backup_id}-{secrets.token_hex(3)}"
        _write_pending(directory, {"origin": origin, "snapshot": snap, "keep": keep is not None,
                                   "pid": os.getpid()})
        t0 = time.monotonic()
        try:
            uri, block_size = source.create(origin, snap)
        except BaseException:
            _clear_pending(directory)
            raise
        dropped = False
        try:
            record, result, changed, phases = _copy(
                source, directory, backup_id, origin, snap, uri, block_size, since, parent,
                parent_chain, keep is not None, progress)
            man.backups.append(record)
            manifest.save(directory, man)
        except SnapimgError as err:
            if keep is not None:
                raise type(err)(f"{err} (snapshot {origin}@{snap} is kept: drop it with "
                                f"'snapimg snapshot drop' before retrying)") from None
            raise
        finally:
            if keep is None:
                dropped = source.drop(origin, snap)
            _clear_pending(directory)
        return BackupResult(record, result, changed, time.monotonic() - t0, dropped, notice,
                            *phases)


def _copy(source: SnapshotSource, directory: Path, backup_id: str, origin: str, snap: str,
          uri: str, block_size: int, since: str | None, parent: BackupRecord | None,
          parent_chain: list[BackupRecord], kept: bool,
          progress: bool | None
          ) -> tuple[BackupRecord, CopyResult, int, tuple[float, float]]:
    kind: manifest.Kind = "full" if parent is None else "incremental"
    name = f"{backup_id}.raw" if parent is None else f"{backup_id}.inc"
    final = directory / name
    tmp = directory / f".{name}.tmp"
    with NbdSource(uri) as src:
        size = src.size
        if parent is not None and parent.size != size:
            raise BackupError(f"{origin} is {size} bytes now, backup {parent.id} has "
                              f"{parent.size}: take a full backup")
        if since is not None:
            ranges = merge_ranges(source.changed_ranges(origin, since), size)
        else:
            ranges = [(0, size)] if size else []
        bar = Progress(f"backup {backup_id}", 0, enabled=progress)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            t0 = time.monotonic()
            result = copy_ranges(src, fd, ranges, hash_stream=parent is None, progress=bar)
            t1 = time.monotonic()
            bar.finish()
            if parent is None:
                assert result.sha256 is not None
                digest = result.sha256
                changed = _blocks(result.data, block_size)
                written = result.bytes_written
            else:
                table = incfile.IncTable(size, block_size, result.data, result.zero)
                incfile.write_table(fd, table)
                os.fsync(fd)
                segments = chain.overlay(chain.image_map(directory, parent_chain),
                                         table.overrides(), tmp, size)
                hash_bar = Progress(f"sha256 {backup_id}", size, enabled=progress)
                digest = chain.hash_segments(segments, hash_bar)
                hash_bar.finish()
                changed = _blocks(ranges, block_size)
                written = result.bytes_written
            t2 = time.monotonic()
            publish(fd, tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    record = BackupRecord(
        id=backup_id, parent=parent.id if parent else None, kind=kind, origin=origin,
        snapshot=f"{origin}@{snap}", created=datetime.now(UTC).isoformat(timespec="seconds"),
        file=name, size=size, block_size=block_size, bytes_written=written, sha256=digest,
        snapshot_kept=kept)
    return record, result, changed, (t1 - t0, t2 - t1)


def _write_pending(directory: Path, obj: dict[str, Any]) -> None:
    path = directory / PENDING_NAME
    path.write_text(json.dumps(obj) + "\n")
    fsync_dir(directory)


def _clear_pending(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / PENDING_NAME).unlink()


def _recover(source: SnapshotSource, directory: Path) -> None:
    """Clean up after a backup that was killed: its temporary files and snapshot."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    path = directory / PENDING_NAME
    try:
        pending = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        pending = {}
    origin, snap = pending.get("origin"), pending.get("snapshot")
    if isinstance(origin, str) and isinstance(snap, str) and not pending.get("keep"):
        source.drop(origin, snap)  # fails harmlessly if it is gone already
    _clear_pending(directory)
