"""Snapshot state: identity, validity, limits, released ranges and private blocks."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import UTC, datetime

from snapimg.engine.barrier import Barrier
from snapimg.snapinfo import OnFull, SnapshotInfo


class IntervalSet:
    """Merged, sorted half-open integer intervals (released block ranges)."""

    def __init__(self) -> None:
        self.starts: list[int] = []  # read-only outside: empty means no intervals
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect_left(self._ends, start)  # first interval that ends at/after start
        j = bisect_right(self.starts, end)  # intervals starting at/before end touch
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self._ends[j - 1])
        self.starts[i:j] = [start]
        self._ends[i:j] = [end]

    def contains(self, x: int) -> bool:
        i = bisect_right(self.starts, x) - 1
        return i >= 0 and x < self._ends[i]

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect_right(self.starts, end - 1) - 1
        return i >= 0 and self._ends[i] > start

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self._ends, strict=True))


@dataclass
class SnapshotState:
    """One snapshot of one origin; ``gen`` orders it among that origin's snapshots."""

    origin: str
    name: str
    gen: int
    created: float
    max_size: int | None
    writable: bool
    on_full: OnFull
    valid: bool = True
    reason: str | None = None
    invalid_time: float = 0.0
    preserved: int = 0  # blocks of the store it reads (shared copies + private blocks)
    released: IntervalSet = field(default_factory=IntervalSet)
    private: dict[int, int] = field(default_factory=dict)  # block -> slot
    dropped: bool = False  # devices made before the drop then refuse I/O
    # A writable snapshot's own writes run exclusive, its reads shared: an own write
    # frees the copy its private block replaces, which a read may be reading.
    access: Barrier = field(default_factory=Barrier, compare=False, repr=False)

    def excludes(self, block: int) -> bool:
        """True when origin writes to ``block`` need no copy for this snapshot."""
        return block in self.private or self.released.contains(block)

    @property
    def has_exclusions(self) -> bool:
        return bool(self.private) or bool(self.released)

    def max_blocks(self, block_size: int) -> int | None:
        return None if self.max_size is None else self.max_size // block_size

    def invalidate(self, reason: str, when: float) -> None:
        """Mark it invalid (the index then frees what it held)."""
        self.valid = False
        self.reason = reason
        self.invalid_time = when

    def info(self, block_size: int) -> SnapshotInfo:
        reason = self.reason
        if not self.valid and self.invalid_time:
            stamp = datetime.fromtimestamp(self.invalid_time, UTC).isoformat(timespec="seconds")
            reason = f"{reason} (at {stamp})"
        return SnapshotInfo(
            origin=self.origin,
            snap=self.name,
            created=datetime.fromtimestamp(self.created, UTC),
            valid=self.valid,
            reason=reason,
            preserved_blocks=self.preserved,
            preserved_bytes=self.preserved * block_size,
            max_size=self.max_size,
            block_size=block_size,
            writable=self.writable,
            on_full=self.on_full,
        )
