"""Block association of one origin: which store slot holds which snapshot's old block.

Snapshots of an origin get increasing generation numbers.  For every origin block the
block table (:mod:`snapimg.engine.table`) holds one packed entry for the *latest* copy
of that block (0: never copied).  A copy taken while the newest live snapshot was ``h``
holds the block as it was when every snapshot with a generation in ``(p, h]`` was
created, ``p`` being the generation of the block's previous copy: one copy serves all
of them.  Older copies that a live snapshot still needs move to the small ``overflow``
dict (block -> entries, oldest first).  Snapshot ``g`` reads block ``b`` from the first
copy whose generation is ``>= g``, else from the origin (:meth:`OriginIndex.sources`).

Everything here is pure in-memory bookkeeping, called with the data path's metadata
lock held; the same calls replay the store's log on open, so they must be
deterministic.  Functions that stop needing a slot return it so the caller can free it
in the store.  After every change of the live set or of a snapshot's validity or
exclusions the index publishes its view to the table (for the compiled data path),
always before the caller frees the slots it returned.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator

from snapimg.engine.snapshot import SnapshotState
from snapimg.engine.table import (
    CHUNK_SHIFT,
    GEN_SHIFT,
    SLOT_MASK,
    SNAP_SIMPLE,
    SNAP_VALID,
    BlockTable,
    Table,
    pack,
)

Segment = tuple[int, int, int]  # (slot, or -1 for the origin; first block; count)


class OriginIndex:
    """The snapshots of one origin and the association of their preserved blocks."""

    def __init__(self, nblocks: int, table: Callable[[int], Table] = BlockTable) -> None:
        self.nblocks = nblocks
        self.table: Table = table(nblocks)
        self.overflow: dict[int, list[int]] = {}
        self.snaps: dict[int, SnapshotState] = {}  # by generation, valid or not
        self.live: list[int] = []  # generations of valid snapshots, ascending
        self.next_gen = 1
        self.excluding = 0  # live snapshots with released or private blocks

    # -- snapshots ------------------------------------------------------------------

    @property
    def newest(self) -> int:
        return self.live[-1] if self.live else 0

    def publish(self) -> None:
        """Tell the table the live view (after any change of it)."""
        flags = [
            (g, (SNAP_VALID if s.valid else 0) | (0 if s.has_exclusions else SNAP_SIMPLE))
            for g, s in self.snaps.items()
        ]
        self.table.publish(self.newest, self.excluding, flags)

    def add_snapshot(self, snap: SnapshotState) -> None:
        self.snaps[snap.gen] = snap
        self.next_gen = max(self.next_gen, snap.gen + 1)
        if snap.valid:
            insort(self.live, snap.gen)
            self.excluding += snap.has_exclusions
        self.publish()

    def _retire(self, snap: SnapshotState) -> list[int]:
        """Take ``snap`` out of the live set (if it is in it) and free what only it
        needed; it holds no blocks afterwards."""
        live = self.live
        i = bisect_left(live, snap.gen)
        if i < len(live) and live[i] == snap.gen:
            del live[i]
            self.excluding -= snap.has_exclusions
        freed = list(snap.private.values())
        for b, _ in list(self.table.blocks_from_gen(snap.gen)):
            freed.extend(self.collect(b))
        snap.preserved = 0
        snap.private.clear()
        return freed

    def drop(self, gen: int) -> list[int]:
        snap = self.snaps.pop(gen)
        freed = self._retire(snap)
        snap.dropped = True
        self.publish()
        return freed

    def invalidate(self, gen: int, reason: str, when: float) -> list[int]:
        snap = self.snaps[gen]
        if not snap.valid:
            return []
        # Readers first learn that it is invalid (they check after reading), and only
        # then are its copies freed: a read that took a block from the origin because
        # its copy was gone must fail its check, not return the origin's newer data.
        snap.invalidate(reason, when)
        self.publish()
        freed = self._retire(snap)
        self.publish()
        return freed

    # -- lookups ----------------------------------------------------------------------

    def lookup(self, b: int, gen: int) -> int:
        """The slot snapshot ``gen`` reads block ``b`` from, or -1 for the origin."""
        e = self.table.get(b)
        if e >> GEN_SHIFT < gen:
            return -1
        older = self.overflow.get(b)
        if older:
            for o in older:
                if o >> GEN_SHIFT >= gen:
                    return (o & SLOT_MASK) - 1
        return (e & SLOT_MASK) - 1

    def sources(self, snap: SnapshotState, b0: int, n: int) -> list[Segment]:
        """Where snapshot ``snap`` reads blocks [b0, b0+n) from, as merged segments:
        consecutive slots, or the origin (slot -1)."""
        ents = self.table.get_run(b0, n)
        limit = snap.gen << GEN_SHIFT
        private, overflow = snap.private, self.overflow
        if not private:
            if max(ents) < limit:
                return [(-1, b0, n)]
            first = ents[0]
            # one run of consecutive slots of one generation, no older versions around
            if first >= limit and not overflow and ents == array("Q", range(first, first + n)):
                return [((first & SLOT_MASK) - 1, b0, n)]
        segs: list[list[int]] = []
        for i, e in enumerate(ents):
            b = b0 + i
            if private and b in private:
                slot = private[b]
            elif e < limit:
                slot = -1
            elif overflow and b in overflow:
                slot = self.lookup(b, snap.gen)
            else:
                slot = (e & SLOT_MASK) - 1
            if segs:
                last = segs[-1]
                if (slot < 0 and last[0] < 0) or (last[0] >= 0 and slot == last[0] + last[2]):
                    last[2] += 1
                    continue
            segs.append([slot, b, 1])
        return [(slot, b, count) for slot, b, count in segs]

    def needers(self, b: int, p: int, h: int) -> list[SnapshotState]:
        """Live snapshots with a generation in (p, h] that read block ``b`` through a
        copy of generation ``h`` (i.e. did not release it or write it privately)."""
        live = self.live
        gens = live[bisect_right(live, p) : bisect_right(live, h)]
        snaps = self.snaps
        if not self.excluding:
            return [snaps[g] for g in gens]
        return [snaps[g] for g in gens if not snaps[g].excludes(b)]

    def plan(self, b0: int, n: int) -> list[tuple[int, int]]:
        """Runs (block, count) within [b0, b0+n) that an origin write must copy first.

        Advisory (the caller copies, then :meth:`install` decides under the lock)."""
        live = self.live
        if not live:
            return []
        newest = live[-1]
        ents = self.table.get_run(b0, n)
        limit = newest << GEN_SHIFT
        if min(ents) >= limit:
            return []
        runs: list[tuple[int, int]] = []
        start = -1
        for i, e in enumerate(ents):
            if e < limit and (not self.excluding or self.needers(b0 + i, e >> GEN_SHIFT, newest)):
                if start < 0:
                    start = i
            elif start >= 0:
                runs.append((b0 + start, i - start))
                start = -1
        if start >= 0:
            runs.append((b0 + start, n - start))
        return runs

    def demand(self, b0: int, n: int, gen: int) -> dict[int, int]:
        """How many blocks each live snapshot (by generation) would gain if blocks
        [b0, b0+n) were copied now at generation ``gen``."""
        out: dict[int, int] = {}
        cache: dict[int, list[SnapshotState]] = {}
        ents = self.table.get_run(b0, n)
        if not self.excluding and not max(ents):  # never copied: one interval for all
            return {s.gen: n for s in self.needers(b0, 0, gen)}
        for i, e in enumerate(ents):
            p = e >> GEN_SHIFT
            if p >= gen:
                continue
            if self.excluding:
                nd = self.needers(b0 + i, p, gen)
            elif p in cache:
                nd = cache[p]
            else:
                nd = cache[p] = self.needers(b0, p, gen)
            for s in nd:
                out[s.gen] = out.get(s.gen, 0) + 1
        return out

    # -- changes --------------------------------------------------------------------

    def install(self, b0: int, n: int, gen: int, slot0: int) -> list[int]:
        """Blocks [b0, b0+n) were copied at generation ``gen`` into slots from ``slot0``.

        Each block's copy becomes its latest unless another writer preserved it first
        or no live snapshot needs it; those slots come back for freeing."""
        unused: list[int] = []
        table = self.table
        if not self.excluding and not max(table.get_run(b0, n)):
            fresh = self.needers(b0, 0, gen)  # never copied: the same needers for all
            if not fresh:
                return list(range(slot0, slot0 + n))
            table.set_run(b0, pack(gen, slot0), n)
            for s in fresh:
                s.preserved += n
            return []
        for i in range(n):
            b = b0 + i
            old = table.get(b)
            p = old >> GEN_SHIFT
            nd = self.needers(b, p, gen) if p < gen else None
            if not nd:
                unused.append(slot0 + i)
                continue
            if old:
                self._keep_older(b, old)
            table.set(b, pack(gen, slot0 + i))
            for s in nd:
                s.preserved += 1
        return unused

    def restore_entry(self, b: int, entry: int) -> None:
        """Checkpoint replay: append ``entry`` as the block's newest copy."""
        old = self.table.get(b)
        if old:
            self._keep_older(b, old)
        self.table.set(b, entry)

    def _keep_older(self, b: int, entry: int) -> None:
        """A newer copy of block ``b`` replaces ``entry`` as its latest: keep it."""
        older = self.overflow.get(b)
        if older is None:
            self.overflow[b] = [entry]
            self.table.mark_overflow(b, True)
        else:
            older.append(entry)

    def collect(self, b: int) -> list[int]:
        """Drop copies of block ``b`` that no live snapshot needs; return their slots."""
        latest = self.table.get(b)
        if not latest:
            return []
        chain = [*self.overflow.get(b, ()), latest]
        keep: list[int] = []
        freed: list[int] = []
        p = 0
        for e in chain:
            h = e >> GEN_SHIFT
            if self.needers(b, p, h):
                keep.append(e)
            else:
                freed.append((e & SLOT_MASK) - 1)
            p = h
        if freed:
            self.table.set(b, keep.pop() if keep else 0)
            if keep:
                self.overflow[b] = keep
            elif self.overflow.pop(b, None) is not None:
                self.table.mark_overflow(b, False)
        return freed

    def _exclude(self, snap: SnapshotState, b: int) -> list[int]:
        """``snap`` stops reading block ``b`` through shared copies or its private slot."""
        freed: list[int] = []
        slot = snap.private.pop(b, None)
        if slot is not None:
            freed.append(slot)
            snap.preserved -= 1
        elif self.lookup(b, snap.gen) >= 0:
            snap.preserved -= 1
        return freed

    def release(self, gen: int, b0: int, n: int) -> list[int]:
        """Snapshot ``gen`` released blocks [b0, b0+n): they read as an error from now
        on and their copies are freed when nobody else needs them."""
        snap = self.snaps[gen]
        if not snap.valid:
            return []
        before = snap.has_exclusions
        freed: list[int] = []
        touched: list[int] = []
        for b in range(b0, b0 + n):
            if snap.released.contains(b):
                continue
            freed.extend(self._exclude(snap, b))
            touched.append(b)
        snap.released.add(b0, b0 + n)
        self.excluding += snap.has_exclusions - before
        for b in touched:
            freed.extend(self.collect(b))
        self.publish()
        return freed

    def add_private(self, gen: int, b: int, slot: int) -> list[int]:
        """Writable snapshot ``gen`` now keeps block ``b`` in its own ``slot``."""
        snap = self.snaps[gen]
        before = snap.has_exclusions
        freed = self._exclude(snap, b)
        snap.private[b] = slot
        snap.preserved += 1
        self.excluding += snap.has_exclusions - before
        freed.extend(self.collect(b))
        self.publish()
        return freed

    def restore_private(self, gen: int, b: int, slot: int) -> None:
        snap = self.snaps[gen]
        before = snap.has_exclusions
        snap.private[b] = slot
        self.excluding += snap.has_exclusions - before
        if not before:
            self.publish()

    def restore_released(self, gen: int, b0: int, n: int) -> None:
        snap = self.snaps[gen]
        before = snap.has_exclusions
        snap.released.add(b0, b0 + n)
        self.excluding += snap.has_exclusions - before
        if not before:
            self.publish()

    # -- walking ----------------------------------------------------------------------

    def changed_blocks(self, gen: int) -> list[tuple[int, int]]:
        """Merged (block, count) runs that snapshot ``gen`` has a copy for, plus its
        released and private blocks (a superset of what changed since it was taken)."""
        snap = self.snaps[gen]
        marks = [b for b, _ in self.table.blocks_from_gen(gen)]
        marks.extend(snap.private)
        for s, e in snap.released.intervals():
            marks.extend(range(s, e))
        runs: list[tuple[int, int]] = []
        for b in sorted(set(marks)):
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        return runs

    def entry_runs(self) -> Iterator[tuple[int, int, int, int]]:
        """The association as (block, count, gen, slot) runs in checkpoint order:
        overflow entries first (oldest first), then the latest entries."""
        for b in sorted(self.overflow):
            for e in self.overflow[b]:
                yield b, 1, e >> GEN_SHIFT, (e & SLOT_MASK) - 1
        for ci, chunk in self.table.chunk_items():
            base = ci << CHUNK_SHIFT
            run: list[int] | None = None  # [block, count, gen, slot]
            for i, e in enumerate(chunk):
                if not e:
                    continue
                g, s = e >> GEN_SHIFT, (e & SLOT_MASK) - 1
                if run and run[0] + run[1] == base + i and run[2] == g and run[3] + run[1] == s:
                    run[1] += 1
                    continue
                if run:
                    yield run[0], run[1], run[2], run[3]
                run = [base + i, 1, g, s]
            if run:
                yield run[0], run[1], run[2], run[3]

    def referenced_slots(self) -> Iterator[tuple[int, int]]:
        """(slot, count) runs of every slot this origin's snapshots still use."""
        for _b, count, _g, slot in self.entry_runs():
            yield slot, count
        for snap in self.snaps.values():
            for slot in snap.private.values():
                yield slot, 1
