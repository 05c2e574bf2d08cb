"""The qsd backend's record of its snapshots in the store dir (``qsd-snapshots.json``).

qemu-storage-daemon keeps snapshots only in its memory: they end with the daemon.  The
record lets a restarted ``snapimg serve --backend qsd`` report each earlier snapshot as
invalid with a reason instead of forgetting it silently.  Writes are atomic (rename).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from snapimg.errors import StoreError
from snapimg.snapinfo import SnapshotInfo

RECORD_NAME = "qsd-snapshots.json"


def record_path(store_dir: Path) -> Path:
    return store_dir / RECORD_NAME


def save(store_dir: Path, infos: list[SnapshotInfo], targets: dict[str, str]) -> None:
    """Write every snapshot (valid or not) with its target file name (if it has one)."""
    rows: list[dict[str, Any]] = []
    for info in infos:
        row = info.to_json()
        row["target"] = targets.get(info.name)
        rows.append(row)
    path = record_path(store_dir)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"version": 1, "snapshots": rows}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err.strerror}") from None


def load(store_dir: Path) -> list[tuple[SnapshotInfo, str | None]]:
    """The recorded snapshots and their target file names; [] when there is no record."""
    path = record_path(store_dir)
    try:
        data = json.loads(path.read_text())
        rows = data["snapshots"]
        return [(_info(row), row.get("target")) for row in rows]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"unreadable qsd snapshot record {path}: {err}") from None


def _info(row: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        origin=str(row["origin"]),
        snap=str(row["snapshot"]),
        created=datetime.fromisoformat(row["created"]),
        valid=row["state"] == "valid",
        reason=row["reason"],
        preserved_blocks=int(row["preserved_blocks"]),
        preserved_bytes=int(row["preserved_bytes"]),
        max_size=None if row["max_size"] is None else int(row["max_size"]),
        block_size=int(row["block_size"]),
        writable=bool(row["writable"]),
        on_full=row["on_full"],
    )
