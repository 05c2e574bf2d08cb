"""Block association of one origin: which store slot holds which snapshot's old block.

Snapshots of an origin get increasing generation numbers.  For every origin block the
sparse :class:`BlockTable` holds one packed entry ``gen << 40 | slot + 1`` for the
*latest* copy of that block (0: never copied).  A copy taken while the newest live
snapshot was ``h`` holds the block as it was when every snapshot with a generation in
``(p, h]`` was created, ``p`` being the generation of the block's previous copy: one
copy serves all of them.  Older copies that a live snapshot still needs move to the
small ``overflow`` dict (block -> entries, oldest first).  Snapshot ``g`` reads block
``b`` from the first copy whose generation is ``>= g``, else from the origin.

The table costs 8 bytes per origin block in chunks allocated on first touch, so a
snapshot of a huge sparse origin is created in O(1) and lookups are O(1).

Everything here is pure in-memory bookkeeping, called with the engine's metadata lock
held; the same calls replay the store's log on open, so they must be deterministic.
Functions that stop needing a slot return it so the caller can free it in the store.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right, insort
from collections.abc import Iterator

from snapimg.engine.snapshot import SnapshotState

GEN_SHIFT = 40
SLOT_MASK = (1 << GEN_SHIFT) - 1
MAX_GEN = (1 << 24) - 1
CHUNK_SHIFT = 12
CHUNK = 1 << CHUNK_SHIFT
_ZERO_CHUNK = array("Q", bytes(8 * CHUNK))


def pack(gen: int, slot: int) -> int:
    return gen << GEN_SHIFT | (slot + 1)


def gen_of(entry: int) -> int:
    return entry >> GEN_SHIFT


def slot_of(entry: int) -> int:
    return (entry & SLOT_MASK) - 1


class BlockTable:
    """A sparse array of uint64, in chunks of 4096 entries allocated on first write."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.chunks: dict[int, array[int]] = {}
        self.chunk_max_gen: dict[int, int] = {}

    def get(self, b: int) -> int:
        chunk = self.chunks.get(b >> CHUNK_SHIFT)
        return 0 if chunk is None else chunk[b & (CHUNK - 1)]

    def get_run(self, b: int, n: int) -> array[int]:
        ci, off = b >> CHUNK_SHIFT, b & (CHUNK - 1)
        if off + n <= CHUNK:
            chunk = self.chunks.get(ci, _ZERO_CHUNK)
            return chunk[off : off + n]
        out = array("Q")
        while n > 0:
            take = min(n, CHUNK - off)
            out.extend(self.chunks.get(ci, _ZERO_CHUNK)[off : off + take])
            n -= take
            ci, off = ci + 1, 0
        return out

    def set(self, b: int, entry: int) -> None:
        ci = b >> CHUNK_SHIFT
        chunk = self.chunks.get(ci)
        if chunk is None:
            if not entry:
                return
            chunk = self.chunks[ci] = array("Q", _ZERO_CHUNK)
        chunk[b & (CHUNK - 1)] = entry
        g = entry >> GEN_SHIFT
        if g > self.chunk_max_gen.get(ci, 0):
            self.chunk_max_gen[ci] = g

    def set_run(self, b: int, first: int, n: int) -> None:
        """Entries ``first, first+1, ...`` (one generation, consecutive slots) for
        blocks [b, b+n)."""
        while n > 0:
            ci, off = b >> CHUNK_SHIFT, b & (CHUNK - 1)
            take = min(n, CHUNK - off)
            chunk = self.chunks.get(ci)
            if chunk is None:
                chunk = self.chunks[ci] = array("Q", _ZERO_CHUNK)
            chunk[off : off + take] = array("Q", range(first, first + take))
            g = first >> GEN_SHIFT
            if g > self.chunk_max_gen.get(ci, 0):
                self.chunk_max_gen[ci] = g
            b, n, first = b + take, n - take, first + take

    def blocks_from_gen(self, lo: int) -> Iterator[tuple[int, int]]:
        """(block, entry) for every entry whose generation is ``>= lo``, ascending."""
        limit = lo << GEN_SHIFT
        for ci in sorted(self.chunks):
            if self.chunk_max_gen.get(ci, 0) < lo:
                continue
            base = ci << CHUNK_SHIFT
            chunk = self.chunks[ci]
            if max(chunk) < limit:
                continue
            for i, e in enumerate(chunk):
                if e >= limit:
                    yield base + i, e

    def nbytes(self) -> int:
        return sum(c.buffer_info()[1] * c.itemsize for c in self.chunks.values())


class OriginIndex:
    """The snapshots of one origin and the association of their preserved blocks."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.table = BlockTable(nblocks)
        self.overflow: dict[int, list[int]] = {}
        self.snaps: dict[int, SnapshotState] = {}  # by generation, valid or not
        self.live: list[int] = []  # generations of valid snapshots, ascending
        self.next_gen = 1
        self.excluding = 0  # live snapshots with released or private blocks

    # -- snapshots ------------------------------------------------------------------

    @property
    def newest(self) -> int:
        return self.live[-1] if self.live else 0

    def add_snapshot(self, snap: SnapshotState) -> None:
        self.snaps[snap.gen] = snap
        self.next_gen = max(self.next_gen, snap.gen + 1)
        if snap.valid:
            insort(self.live, snap.gen)
            self.excluding += snap.has_exclusions

    def _retire(self, snap: SnapshotState) -> list[int]:
        """Take ``snap`` out of the live set and free what only it needed."""
        freed: list[int] = []
        if snap.valid:
            self.live.remove(snap.gen)
            self.excluding -= snap.has_exclusions
        freed.extend(snap.private.values())
        for b, _ in list(self.table.blocks_from_gen(snap.gen)):
            freed.extend(self.collect(b))
        return freed

    def drop(self, gen: int) -> list[int]:
        snap = self.snaps.pop(gen)
        freed = self._retire(snap)
        snap.dropped = True
        return freed

    def invalidate(self, gen: int, reason: str, when: float) -> list[int]:
        snap = self.snaps[gen]
        if not snap.valid:
            return []
        freed = self._retire(snap)
        snap.invalidate(reason, when)
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
            if e < limit and (
                not self.excluding or self.needers(b0 + i, e >> GEN_SHIFT, newest)
            ):
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
        table, overflow = self.table, self.overflow
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
                overflow.setdefault(b, []).append(old)
            table.set(b, pack(gen, slot0 + i))
            for s in nd:
                s.preserved += 1
        return unused

    def restore_entry(self, b: int, entry: int) -> None:
        """Checkpoint replay: append ``entry`` as the block's newest copy."""
        old = self.table.get(b)
        if old:
            self.overflow.setdefault(b, []).append(old)
        self.table.set(b, entry)

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
            else:
                self.overflow.pop(b, None)
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
        return freed

    def restore_private(self, gen: int, b: int, slot: int) -> None:
        snap = self.snaps[gen]
        before = snap.has_exclusions
        snap.private[b] = slot
        self.excluding += snap.has_exclusions - before

    def restore_released(self, gen: int, b0: int, n: int) -> None:
        snap = self.snaps[gen]
        before = snap.has_exclusions
        snap.released.add(b0, b0 + n)
        self.excluding += snap.has_exclusions - before

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
        for ci in sorted(self.table.chunks):
            base = ci << CHUNK_SHIFT
            run: list[int] | None = None  # [block, count, gen, slot]
            for i, e in enumerate(self.table.chunks[ci]):
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
