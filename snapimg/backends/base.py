"""What the control socket needs from a backend (native engine or qemu-storage-daemon).

The control server (:mod:`snapimg.control`) and the CLI talk to every backend only through
:class:`Backend`; snapshot facts travel as :class:`SnapshotInfo`, whose :meth:`to_json`
is the contract of ``snapimg snapshot list --json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

OnFull = Literal["invalidate", "block-writes"]
ON_FULL_CHOICES: tuple[OnFull, ...] = ("invalidate", "block-writes")


@dataclass(frozen=True)
class SnapshotInfo:
    origin: str
    snap: str
    created: datetime
    valid: bool
    reason: str | None
    preserved_blocks: int
    preserved_bytes: int
    max_size: int | None
    block_size: int
    writable: bool
    on_full: OnFull
    # taken while the guest's filesystems were frozen (snapimg.qga); recorded by the control
    # layer after the thaw (snapimg.control.quiesce_notes), never by a backend
    quiesced: bool = False
    frozen_ms: int | None = None

    @property
    def name(self) -> str:
        return f"{self.origin}@{self.snap}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": self.origin,
            "snapshot": self.snap,
            "created": self.created.isoformat(),
            "state": "valid" if self.valid else "invalid",
            "reason": self.reason,
            "preserved_blocks": self.preserved_blocks,
            "preserved_bytes": self.preserved_bytes,
            "max_size": self.max_size,
            "block_size": self.block_size,
            "writable": self.writable,
            "on_full": self.on_full,
            "quiesced": self.quiesced,
            "frozen_ms": self.frozen_ms,
        }


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

    async def release(
        self, origin: str, snap: str, offset: int, length: int
    ) -> tuple[int, int]:
        """Free store space of a range the backup reader has copied; it then reads as EIO.

        Only whole blocks are freed: returns the (offset, length) released, and raises
        :class:`~snapimg.errors.UsageError` for a range that covers no whole block."""
        ...

    async def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        """(offset, length) ranges, block-aligned, written on the origin since ``snap`` was
        created (a superset is allowed, never a subset): what an incremental backup copies."""
        ...

    async def close(self) -> None: ...
