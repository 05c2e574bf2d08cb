"""What the control socket needs from a backend (native engine or qemu-storage-daemon).

The control server (:mod:`snapimg.control`) and the CLI talk to every backend only through
:class:`Backend`; snapshot facts travel as :class:`~snapimg.snapinfo.SnapshotInfo`, whose
``to_json`` is the contract of ``snapimg snapshot list --json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from snapimg.snapinfo import OnFull, SnapshotInfo


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    uri: str


class Backend(Protocol):
    """A running data plane: its exports and the snapshot lifecycle."""

    datapath: str  # what moves the data: "compiled", "python" or "qemu-storage-daemon"

    async def exports(self) -> list[ExportInfo]: ...

    async def create_snapshot(
        self, origin: str, snap: str, *, max_size: int | None, writable: bool, on_full: OnFull
    ) -> SnapshotInfo: ...

    async def drop_snapshot(self, origin: str, snap: str) -> None: ...

    async def list_snapshots(self) -> list[SnapshotInfo]: ...

    async def release(self, origin: str, snap: str, offset: int, length: int) -> tuple[int, int]:
        """Free store space of a range the backup reader has copied; it then reads as EIO.

        Only whole blocks are freed: returns the (offset, length) released, and raises
        :class:`~snapimg.errors.UsageError` for a range that covers no whole block."""
        ...

    async def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        """(offset, length) ranges, block-aligned, written on the origin since ``snap`` was
        created (a superset is allowed, never a subset): what an incremental backup copies."""
        ...

    async def close(self) -> None: ...
