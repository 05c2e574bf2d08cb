"""Which snapshots were taken while the guest was frozen: ``quiesce.json`` in the store dir.

Why a sidecar and not the store: whether a guest was quiesced is known to the client that
froze it (``snapimg snapshot create --quiesce``), and only after the thaw, when the frozen
window's length is known; the engine's store format and the qsd backend's record are
backend business and stay as they are.  The client reports it with the control method
``record_quiesce`` outside the frozen window (a write here must not lengthen the window),
and the control server keeps it here for every backend alike.

Format: ``{"version": 1, "snapshots": {"ORIGIN@SNAP": {"created": ISO, "frozen_ms": N}}}``.
A note counts only for the snapshot of that name *and* creation time, so a snapshot dropped
and created again under the same name does not inherit it; notes of snapshots that are gone
are pruned at the next write.  Writes are atomic: temporary file, fsync, rename, fsync of
the directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from snapimg.errors import StoreError
from snapimg.snapinfo import SnapshotInfo

NOTES_NAME = "quiesce.json"


class QuiesceNotes:
    def __init__(self, store_dir: Path) -> None:
        self.path = store_dir / NOTES_NAME

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            notes = data["snapshots"]
            if not isinstance(notes, dict):
                raise TypeError("snapshots is not an object")
            return {str(k): v for k, v in notes.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"unreadable quiesce record {self.path}: {err}") from None

    def _save(self, notes: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{NOTES_NAME}.tmp")
        text = json.dumps({"version": 1, "snapshots": notes}, indent=1, sort_keys=True) + "\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise StoreError(f"cannot write {self.path}: {err.strerror}") from None

    def annotate(self, infos: list[SnapshotInfo]) -> list[SnapshotInfo]:
        """``infos`` with ``quiesced`` / ``frozen_ms`` set from the notes that match."""
        notes = self._load()
        return [_apply(info, notes.get(info.name)) for info in infos]

    def record(self, info: SnapshotInfo, frozen_ms: int, alive: list[SnapshotInfo]) -> SnapshotInfo:
        """Note ``info`` as quiesced; notes of snapshots not in ``alive`` are dropped."""
        living = {i.name: i.created.isoformat() for i in alive}
        notes = {
            name: note
            for name, note in self._load().items()
            if living.get(name) == note.get("created")
        }
        note = {"created": info.created.isoformat(), "frozen_ms": frozen_ms}
        notes[info.name] = note
        self._save(notes)
        return _apply(info, note)

    def forget(self, name: str) -> None:
        notes = self._load()
        if notes.pop(name, None) is not None:
            self._save(notes)


def _apply(info: SnapshotInfo, note: dict[str, Any] | None) -> SnapshotInfo:
    if note is None or note.get("created") != info.created.isoformat():
        return info
    frozen_ms = note.get("frozen_ms")
    return dataclasses.replace(
        info, quiesced=True, frozen_ms=frozen_ms if isinstance(frozen_ms, int) else None
    )
