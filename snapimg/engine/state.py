"""Everything a store records, in memory: its origins, their snapshots and block
association, changed only through :meth:`StoreState.apply` (live and on replay alike)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from snapimg.engine import records as R
from snapimg.engine.index import OriginIndex
from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.table import BlockTable, Table, pack
from snapimg.errors import StoreFormatError


@dataclass
class OriginEntry:
    id: int
    name: str
    size: int
    fingerprint: str
    index: OriginIndex


class StoreState:
    """``table``: the block table class of the data path (Python or compiled)."""

    def __init__(self, block_size: int, table: Callable[[int], Table] = BlockTable) -> None:
        self.block_size = block_size
        self.table = table
        self.by_id: dict[int, OriginEntry] = {}
        self.by_name: dict[str, OriginEntry] = {}

    def register(self, name: str, size: int, fingerprint: str) -> R.OriginRec:
        oid = max(self.by_id, default=0) + 1
        rec = R.OriginRec(origin=oid, size=size, next_gen=1, name=name, fingerprint=fingerprint)
        self.apply(rec)
        return rec

    def _index(self, oid: int) -> OriginIndex:
        entry = self.by_id.get(oid)
        if entry is None:
            raise StoreFormatError(f"store log names an unknown origin id {oid}")
        return entry.index

    def apply(self, rec: R.Record) -> list[int]:
        """Apply one record; returns the slots it stopped using."""
        try:
            return self._apply(rec)
        except (KeyError, ValueError) as err:
            raise StoreFormatError(f"store log is inconsistent at {rec}: {err!r}") from err

    def _apply(self, rec: R.Record) -> list[int]:
        if isinstance(rec, R.RunRec):
            idx = self._index(rec.origin)
            if rec.kind == R.Kind.COPY:
                return idx.install(rec.block, rec.count, rec.gen, rec.slot)
            if rec.kind == R.Kind.MAP_STATE:
                for i in range(rec.count):
                    idx.restore_entry(rec.block + i, pack(rec.gen, rec.slot + i))
                return []
            freed: list[int] = []
            for i in range(rec.count):
                if rec.kind == R.Kind.PRIVATE:
                    freed.extend(idx.add_private(rec.gen, rec.block + i, rec.slot + i))
                else:
                    idx.restore_private(rec.gen, rec.block + i, rec.slot + i)
            return freed
        if isinstance(rec, R.RangeRec):
            idx = self._index(rec.origin)
            if rec.kind == R.Kind.RELEASE:
                return idx.release(rec.gen, rec.block, rec.count)
            idx.restore_released(rec.gen, rec.block, rec.count)
            return []
        if isinstance(rec, R.DropRec):
            return self._index(rec.origin).drop(rec.gen)
        if isinstance(rec, R.InvalidateRec):
            return self._index(rec.origin).invalidate(rec.gen, rec.reason, rec.time)
        if isinstance(rec, R.SnapRec):
            idx = self._index(rec.origin)
            entry = self.by_id[rec.origin]
            if rec.gen in idx.snaps:
                raise ValueError(f"generation {rec.gen} exists twice")
            idx.add_snapshot(
                SnapshotState(
                    origin=entry.name,
                    name=rec.name,
                    gen=rec.gen,
                    created=rec.created,
                    max_size=rec.max_size,
                    writable=rec.writable,
                    on_full="block-writes" if rec.on_full == "block-writes" else "invalidate",
                    valid=rec.valid,
                    reason=rec.reason or None,
                    invalid_time=rec.invalid_time,
                    preserved=rec.preserved,
                )  # fmt: skip
            )
            return []
        nblocks = (rec.size + self.block_size - 1) // self.block_size
        oe = OriginEntry(
            rec.origin, rec.name, rec.size, rec.fingerprint, OriginIndex(nblocks, self.table)
        )
        oe.index.next_gen = rec.next_gen
        self.by_id[rec.origin] = oe
        self.by_name[rec.name] = oe
        return []

    def checkpoint_records(self) -> Iterator[R.Record]:
        """The whole state as records that :meth:`apply` restores exactly."""
        for o in self.by_id.values():
            yield R.OriginRec(
                origin=o.id,
                size=o.size,
                next_gen=o.index.next_gen,
                name=o.name,
                fingerprint=o.fingerprint,
            )
        for o in self.by_id.values():
            for s in o.index.snaps.values():
                yield R.SnapRec(
                    origin=o.id,
                    gen=s.gen,
                    created=s.created,
                    max_size=s.max_size,
                    writable=s.writable,
                    on_full=s.on_full,
                    valid=s.valid,
                    invalid_time=s.invalid_time,
                    preserved=s.preserved,
                    name=s.name,
                    reason=s.reason or "",
                )
        for o in self.by_id.values():
            for b, count, gen, slot in o.index.entry_runs():
                yield R.RunRec(
                    kind=R.Kind.MAP_STATE, origin=o.id, gen=gen, block=b, count=count, slot=slot
                )
            for s in o.index.snaps.values():
                for start, end in s.released.intervals():
                    yield R.RangeRec(
                        kind=R.Kind.RELEASED_STATE,
                        origin=o.id,
                        gen=s.gen,
                        block=start,
                        count=end - start,
                    )
                for b, slot in sorted(s.private.items()):
                    yield R.RunRec(
                        kind=R.Kind.PRIVATE_STATE,
                        origin=o.id,
                        gen=s.gen,
                        block=b,
                        count=1,
                        slot=slot,
                    )

    def referenced_runs(self) -> Iterator[tuple[int, int]]:
        for o in self.by_id.values():
            yield from o.index.referenced_slots()
