"""DIR/manifest.json: the list of backups in a backup directory (docs/backup.md).

The manifest is an object ``{"format": "snapimg-backup", "version": 1, "backups": [...]}``;
``backups`` is a list, oldest first, of :class:`BackupRecord` objects.  It is only ever
replaced atomically (temporary file, fsync, rename, fsync of the directory), so a reader
sees either the old or the new list, never a mix.  Writers hold :func:`locked` on DIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from snapimg.backup.fileio import fsync_dir
from snapimg.errors import BackupError

MANIFEST_NAME = "manifest.json"
FORMAT = "snapimg-backup"
VERSION = 1
LOCK_NAME = ".lock"

Kind = Literal["full", "incremental"]
_ID_RE = re.compile(r"^b(\d{4,})$")


@dataclass(frozen=True)
class BackupRecord:
    """One backup: a full sparse raw image or an incremental over ``parent``."""

    id: str
    parent: str | None
    kind: Kind
    origin: str
    snapshot: str  # NAME@SNAP, the snapshot the backup was copied from
    created: str  # ISO 8601, UTC
    file: str  # file name inside DIR
    size: int  # size of the full image in bytes
    block_size: int
    bytes_written: int
    sha256: str  # of the full image as of this backup
    snapshot_kept: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> BackupRecord:
        if not isinstance(obj, dict):
            raise BackupError("manifest: a backup entry is not an object")
        try:
            rec = cls(**{k: obj[k] for k in _FIELDS if k in obj})
        except TypeError as err:
            raise BackupError(f"manifest: backup entry {obj.get('id')!r}: {err}") from None
        rec._check()
        return rec

    def _check(self) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise BackupError(f"manifest: bad backup id {self.id!r}")
        if self.kind not in ("full", "incremental"):
            raise BackupError(f"manifest: backup {self.id}: bad kind {self.kind!r}")
        if (self.kind == "full") != (self.parent is None):
            raise BackupError(f"manifest: backup {self.id}: a {self.kind} backup with parent "
                              f"{self.parent!r}")
        if not isinstance(self.file, str) or "/" in self.file or self.file.startswith("."):
            raise BackupError(f"manifest: backup {self.id}: bad file name {self.file!r}")
        if not isinstance(self.size, int) or self.size < 0:
            raise BackupError(f"manifest: backup {self.id}: bad size {self.size!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise BackupError(f"manifest: backup {self.id}: bad sha256 {self.sha256!r}")


_FIELDS = tuple(BackupRecord.__dataclass_fields__)


@dataclass
class Manifest:
    backups: list[BackupRecord] = field(default_factory=list)

    def get(self, backup_id: str) -> BackupRecord:
        for rec in self.backups:
            if rec.id == backup_id:
                return rec
        raise BackupError(f"no backup {backup_id!r} in the manifest")

    def find(self, backup_id: str) -> BackupRecord | None:
        return next((r for r in self.backups if r.id == backup_id), None)

    def latest_of_snapshot(self, snapshot: str) -> BackupRecord | None:
        """The newest backup copied from ``snapshot`` (NAME@SNAP)."""
        return next((r for r in reversed(self.backups) if r.snapshot == snapshot), None)

    def next_id(self) -> str:
        numbers = [int(m.group(1)) for r in self.backups if (m := _ID_RE.match(r.id))]
        return f"b{max(numbers, default=0) + 1:04d}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION,
                "backups": [r.to_json() for r in self.backups]}


def load(directory: Path) -> Manifest:
    """The manifest of ``directory``; an empty one when the file does not exist yet."""
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Manifest()
    except OSError as err:
        raise BackupError(f"cannot read {path}: {err.strerror}") from None
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise BackupError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("backups"), list):
        raise BackupError(f"{path}: expected an object with a list 'backups'")
    if obj.get("format", FORMAT) != FORMAT or obj.get("version", VERSION) != VERSION:
        raise BackupError(f"{path}: unknown format {obj.get('format')!r} "
                          f"version {obj.get('version')!r}")
    manifest = Manifest([BackupRecord.from_json(o) for o in obj["backups"]])
    ids = [r.id for r in manifest.backups]
    if len(set(ids)) != len(ids):
        raise BackupError(f"{path}: duplicate backup ids")
    return manifest


def save(directory: Path, manifest: Manifest) -> None:
    """Replace DIR/manifest.json atomically (temporary file, fsync, rename, fsync DIR)."""
    path = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    data = (json.dumps(manifest.to_json(), indent=2) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on a backup directory (one writer at a time); fails fast if taken."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"{directory} is in use by another backup") from None
        yield
    finally:
        os.close(fd)
