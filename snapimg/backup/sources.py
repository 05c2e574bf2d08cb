"""Where a backup's snapshot comes from: a ``snapimg serve`` control socket, or a running
QEMU's QMP socket (``snapimg attach``: QEMU does the copy-before-write itself).

A source creates a snapshot and returns its NBD URI, drops it, and, when it can, lists the
ranges written since an older snapshot (what an incremental copies).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from snapimg.errors import BackupError, SnapimgError


class SnapshotSource(Protocol):
    supports_incremental: bool

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        """Create ``origin@snap``; returns (NBD URI of the snapshot, block size)."""
        ...

    def drop(self, origin: str, snap: str) -> bool:
        """Drop ``origin@snap``; False when that failed (it may not exist)."""
        ...

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]: ...


class ControlSource:
    """Snapshots of an origin served by ``snapimg serve`` (its control socket)."""

    supports_incremental = True

    def __init__(self, control: Path) -> None:
        from snapimg.control.client import ControlClient

        self.client = ControlClient(control)

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        info, uri = self.client.create_snapshot(origin, snap, max_size=None, writable=False,
                                                on_full="invalidate")
        if uri is None:
            self.drop(origin, snap)
            raise BackupError(f"the server did not give an NBD URI for {origin}@{snap}")
        return uri, info.block_size

    def drop(self, origin: str, snap: str) -> bool:
        try:
            self.client.drop_snapshot(origin, snap)
        except SnapimgError:
            return False
        return True

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        return self.client.changed_ranges(origin, snap)


class QmpSource:
    """Snapshots of a disk of a running QEMU, through :mod:`snapimg.backends.attach`.

    QEMU keeps no list of blocks changed since an attached snapshot, so incrementals are
    not possible: a backup asked for one falls back to a full backup (with a notice).
    """

    supports_incremental = False

    def __init__(self, qmp: Path, device: str, store_dir: Path) -> None:
        self.qmp = qmp
        self.device = device
        self.store_dir = store_dir

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        from snapimg.backends.attach import attach
        from snapimg.backends.qsd.graph import COPY_GRANULARITY

        result = asyncio.run(attach(self.qmp, self.device, f"{origin}@{snap}",
                                    self.store_dir, None))
        return result.uri, COPY_GRANULARITY

    def drop(self, origin: str, snap: str) -> bool:
        from snapimg.backends.attach import detach

        try:
            asyncio.run(detach(self.qmp, f"{origin}@{snap}"))
        except SnapimgError:
            return False
        return True

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        raise BackupError("a QEMU attached through QMP cannot tell which blocks changed")
