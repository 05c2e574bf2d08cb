"""DIR/manifest.json: the list of backup points in a backup directory (docs/backup.md).

Version 2 (written by this snapimg): ``{"format": "snapimg-backup", "version": 2,
"digest_rule": {"name": "sha256-pieces", "piece_size": 4194304}, "backups": [...]}``, each
backup a qcow2 file with its ``digest`` and a piece digest file.  Version 1 (raw and
``.inc`` files with a whole-image ``sha256``) is still read: restore, verify, ls/cat/inspect
work on it, and ``backup``/``prune`` convert it (:mod:`snapimg.backup.migrate`).

The manifest is only ever replaced atomically (temporary file, fsync, rename, fsync of the
directory), so a reader sees either the old or the new list, never a mix.  Writers hold
:func:`locked` on DIR.
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

from snapimg.digest import PIECE_SIZE, RULE_NAME, rule_json
from snapimg.errors import BackupError
from snapimg.fileio import fsync_dir

MANIFEST_NAME = "manifest.json"
FORMAT = "snapimg-backup"
VERSION = 2
LEGACY_VERSION = 1
LOCK_NAME = ".lock"

Kind = Literal["full", "incremental"]
_ID_RE = re.compile(r"^b(\d{4,})$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BackupRecord:
    """One backup point.  Version 2: ``file`` is ``ID.qcow2`` (an incremental's backing
    file is its parent's), ``digest`` the sha256-pieces image digest, ``pieces`` its piece
    digest file; ``sha256`` (whole image) only when asked for.  Version 1: ``file`` is a raw
    or ``.inc`` file and ``sha256`` is always there."""

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
    digest: str | None = None
    pieces: str | None = None
    sha256: str | None = None
    snapshot_kept: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in asdict(self).items()
            if v is not None or k not in ("digest", "pieces", "sha256")
        }

    @classmethod
    def from_json(cls, obj: Any, version: int) -> BackupRecord:
        if not isinstance(obj, dict):
            raise BackupError("manifest: a backup entry is not an object")
        try:
            rec = cls(**{k: obj[k] for k in _FIELDS if k in obj})
        except TypeError as err:
            raise BackupError(f"manifest: backup entry {obj.get('id')!r}: {err}") from None
        rec._check(version)
        return rec

    def _check(self, version: int) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise BackupError(f"manifest: bad backup id {self.id!r}")
        if self.kind not in ("full", "incremental"):
            raise BackupError(f"manifest: backup {self.id}: bad kind {self.kind!r}")
        if (self.kind == "full") != (self.parent is None):
            raise BackupError(
                f"manifest: backup {self.id}: a {self.kind} backup with parent {self.parent!r}"
            )
        for name in (self.file, self.pieces):
            if name is not None and (
                not isinstance(name, str) or "/" in name or name.startswith(".")
            ):
                raise BackupError(f"manifest: backup {self.id}: bad file name {name!r}")
        if not isinstance(self.size, int) or self.size < 0:
            raise BackupError(f"manifest: backup {self.id}: bad size {self.size!r}")
        if version == LEGACY_VERSION:
            if not _HEX64.fullmatch(str(self.sha256)):
                raise BackupError(f"manifest: backup {self.id}: bad sha256 {self.sha256!r}")
            return
        if not _HEX64.fullmatch(str(self.digest)):
            raise BackupError(f"manifest: backup {self.id}: bad digest {self.digest!r}")
        if self.pieces is None:
            raise BackupError(f"manifest: backup {self.id}: no piece digest file")
        if self.sha256 is not None and not _HEX64.fullmatch(str(self.sha256)):
            raise BackupError(f"manifest: backup {self.id}: bad sha256 {self.sha256!r}")


_FIELDS = tuple(BackupRecord.__dataclass_fields__)


@dataclass
class Manifest:
    backups: list[BackupRecord] = field(default_factory=list)
    version: int = VERSION

    @property
    def legacy(self) -> bool:
        """Version 1: raw and ``.inc`` files, whole-image sha256."""
        return self.version == LEGACY_VERSION

    def find(self, backup_id: str) -> BackupRecord | None:
        return next((r for r in self.backups if r.id == backup_id), None)

    def get(self, backup_id: str) -> BackupRecord:
        rec = self.find(backup_id)
        if rec is None:
            ids = ", ".join(r.id for r in self.backups) or "none"
            raise BackupError(f"no backup {backup_id!r} (the directory has: {ids})")
        return rec

    def point(self, backup_id: str | None) -> BackupRecord:
        """``backup_id``, or the newest point when None."""
        if backup_id is not None:
            return self.get(backup_id)
        if not self.backups:
            raise BackupError("the directory holds no backups")
        return self.backups[-1]

    def latest_of_snapshot(self, snapshot: str) -> BackupRecord | None:
        """The newest backup copied from ``snapshot`` (NAME@SNAP)."""
        return next((r for r in reversed(self.backups) if r.snapshot == snapshot), None)

    def next_id(self) -> str:
        numbers = [int(m.group(1)) for r in self.backups if (m := _ID_RE.match(r.id))]
        return f"b{max(numbers, default=0) + 1:04d}"

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if not self.legacy:
            obj["digest_rule"] = rule_json()
        obj["backups"] = [r.to_json() for r in self.backups]
        return obj


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
    version = obj.get("version", LEGACY_VERSION)
    if obj.get("format", FORMAT) != FORMAT or version not in (LEGACY_VERSION, VERSION):
        raise BackupError(f"{path}: unknown format {obj.get('format')!r} version {version!r}")
    if version == VERSION:
        rule = obj.get("digest_rule")
        if rule != {"name": RULE_NAME, "piece_size": PIECE_SIZE}:
            raise BackupError(
                f"{path}: unsupported digest_rule {rule!r} (this snapimg "
                f"knows {RULE_NAME} with pieces of {PIECE_SIZE} bytes)"
            )
    manifest = Manifest([BackupRecord.from_json(o, version) for o in obj["backups"]], version)
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
    """Exclusive lock on a backup directory (one writer at a time); fails fast if taken.

    The lock file exists only while a writer holds it: it is removed (still locked)
    before the lock is released.  A writer that locked a file another one removed in
    the meantime sees that the name no longer refers to its file, and tries again.
    """
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackupError(f"{directory} is in use by another backup or prune") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
