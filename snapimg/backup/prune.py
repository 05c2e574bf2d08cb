"""``snapimg prune DIR --keep-last N``: merge the oldest points into their children.

One point P at a time, oldest first, until N points remain:

1. The manifest is replaced (atomically) by one without P, in which P's child C is a
   full backup.  C's file still has P's file as backing file, so C reads as before.
2. ``qemu-img commit`` writes C's clusters into P's file.  P is no longer listed; C reads
   the same at every moment (its own clusters hide what changes below them).
3. P's file, now holding exactly C's image and no backing file, is renamed over C's file
   (rename is atomic; a point backed by C's file name reads the same before and after).
4. P's piece digest file is removed.

So a prune killed at any moment (SIGKILL included) leaves a directory in which every
listed point still restores exactly; the next ``prune`` finishes a merge it finds half
done (a listed full point whose file still has a backing file).  When P has several
children, each becomes standalone with ``qemu-img rebase -b ''`` (which copies the data
it reads through P into the child, then drops the backing file) instead; when it has
none, its files are removed after the manifest.  Steps 2 to 4 are exactly what finishing
an interrupted prune does, so there is one code path for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

from snapimg.backup import manifest, qemuimg
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.errors import BackupError, UsageError
from snapimg.fileio import fsync_dir

_POINT_FILE = re.compile(r"b\d{4,}\.(qcow2|pieces)")


@dataclass
class PruneResult:
    removed: list[str]
    remaining: list[str]
    finished: list[str]  # half-done merges of an interrupted prune, completed
    duration: float

    def to_json(self) -> dict[str, object]:
        return {
            "removed": self.removed,
            "remaining": self.remaining,
            "finished": self.finished,
            "duration": round(self.duration, 3),
        }


def prune(directory: Path, keep_last: int, progress: bool = False) -> PruneResult:
    t0 = time.monotonic()
    if keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: keep at least one point")
    if not (directory / manifest.MANIFEST_NAME).is_file():
        raise BackupError(f"{directory} is not a backup directory (no manifest.json)")
    with manifest.locked(directory):
        man = manifest.load(directory)
        if man.legacy:
            from snapimg.backup.migrate import migrate

            man = migrate(directory, man, progress=progress)
        finished = _finish_merges(directory, man)
        removed: list[str] = []
        while len(man.backups) > keep_last:
            oldest = man.backups[0]
            if oldest.parent is not None:
                raise BackupError(
                    f"backup {oldest.id} is the oldest but has parent "
                    f"{oldest.parent}: the manifest is inconsistent"
                )
            _remove_oldest(directory, man, oldest)
            removed.append(oldest.id)
    return PruneResult(removed, [r.id for r in man.backups], finished, time.monotonic() - t0)


def _remove_oldest(directory: Path, man: Manifest, oldest: BackupRecord) -> None:
    """Step 1 (the manifest without ``oldest``, its children full), then the rest as for
    an interrupted prune: that is the one way merges are done."""
    man.backups = [
        dataclasses.replace(r, parent=None, kind="full") if r.parent == oldest.id else r
        for r in man.backups
        if r is not oldest
    ]
    manifest.save(directory, man)
    _finish_merges(directory, man)


def _merge_into(directory: Path, base: Path, top: Path) -> None:
    """Steps 2 and 3: commit ``top`` into ``base`` and rename ``base`` over ``top``."""
    qemuimg.commit(top)
    base.replace(top)
    fsync_dir(directory)


def _finish_merges(directory: Path, man: Manifest) -> list[str]:
    """Complete the merges an interrupted prune left: listed full points whose file
    still has a backing file (the unlisted file of the point that was merged away)."""
    listed = {r.file for r in man.backups}
    dependents: dict[str, list[BackupRecord]] = {}
    for rec in man.backups:
        name = qemuimg.backing_file(directory / rec.file) if rec.parent is None else None
        if name is None:
            continue
        if name in listed or "/" in name or not (directory / name).is_file():
            raise BackupError(
                f"backup {rec.id} is full in the manifest but its file has "
                f"backing file {name}: cannot finish that merge"
            )
        dependents.setdefault(name, []).append(rec)
    finished = []
    for name, recs in dependents.items():
        base = directory / name
        if len(recs) == 1:
            _merge_into(directory, base, directory / recs[0].file)
        else:
            for rec in recs:
                qemuimg.run("rebase", "-q", "-f", "qcow2", "-b", "", str(directory / rec.file))
            _unlink(base)
        finished += [r.id for r in recs]
    _remove_orphans(directory, man)
    return finished


def _remove_orphans(directory: Path, man: Manifest) -> None:
    """Point and piece files no listed point refers to (left by an interrupted prune)."""
    referenced = {r.file for r in man.backups} | {r.pieces for r in man.backups}
    for path in directory.iterdir():
        if _POINT_FILE.fullmatch(path.name) and path.name not in referenced:
            _unlink(path)
    fsync_dir(directory)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
