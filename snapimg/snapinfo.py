"""What a snapshot is to everyone above the data path: :class:`SnapshotInfo`, the facts
the engine and both backends report (its :meth:`~SnapshotInfo.to_json` is the contract
of ``snapimg snapshot list --json``), and :data:`OnFull`, what a snapshot does when its
store space runs out.

It sits below the engine and the backends, which both build it, and the control socket
and the CLI, which pass it on (docs/architecture.md, layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

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
