"""The block table of one origin: a sparse array of packed association entries.

An entry is ``gen << GEN_SHIFT | slot + 1`` (0: the block was never copied): the
*latest* copy of a block, taken while snapshot generation ``gen`` was the newest live
one, held in store slot ``slot``.  :func:`pack`, :func:`entry_gen` and
:func:`entry_slot` are the only places that know this packing.

The table costs 8 bytes per origin block in chunks of :data:`CHUNK` entries allocated
on first write, so a snapshot of a huge sparse origin is created in O(1).

:class:`BlockTable` is the pure-Python table of the reference data path.  The compiled
data path uses ``snapimg._datapath.Table``, which has the same methods and keeps the
entries where C code reads them without the GIL; the index *publishes* to it what that
code needs to decide alone (:meth:`BlockTable.publish`, :meth:`BlockTable.mark_overflow`),
which the Python table ignores.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import Protocol

GEN_SHIFT = 40
SLOT_MASK = (1 << GEN_SHIFT) - 1
MAX_GEN = (1 << 24) - 1
CHUNK_SHIFT = 12
CHUNK = 1 << CHUNK_SHIFT
_ZERO_CHUNK = array("Q", bytes(8 * CHUNK))

# Flags a table publishes per snapshot generation (for reads decided in C).
SNAP_VALID = 1  # valid and not dropped
SNAP_SIMPLE = 2  # no private blocks and no released ranges


def pack(gen: int, slot: int) -> int:
    return gen << GEN_SHIFT | (slot + 1)


def entry_gen(entry: int) -> int:
    return entry >> GEN_SHIFT


def entry_slot(entry: int) -> int:
    """The store slot of a nonzero entry."""
    return (entry & SLOT_MASK) - 1


class Table(Protocol):
    """What the index needs of a block table (Python or compiled)."""

    nblocks: int

    def get(self, b: int) -> int: ...

    def get_run(self, b: int, n: int) -> array[int]: ...

    def set(self, b: int, entry: int) -> None: ...

    def set_run(self, b: int, first: int, n: int) -> None: ...

    def blocks_from_gen(self, lo: int) -> Iterator[tuple[int, int]]: ...

    def chunk_items(self) -> Iterator[tuple[int, array[int]]]: ...

    def nbytes(self) -> int: ...

    def mark_overflow(self, b: int, present: bool) -> None: ...

    def publish(self, newest: int, excluding: int, snaps: Sequence[tuple[int, int]]) -> None: ...


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

    def chunk_items(self) -> Iterator[tuple[int, array[int]]]:
        """(chunk number, entries) of every allocated chunk, ascending."""
        for ci in sorted(self.chunks):
            yield ci, self.chunks[ci]

    def nbytes(self) -> int:
        return sum(c.buffer_info()[1] * c.itemsize for c in self.chunks.values())

    def mark_overflow(self, b: int, present: bool) -> None:
        """Block ``b`` has (or no longer has) older copies kept beside its entry."""

    def publish(self, newest: int, excluding: int, snaps: Sequence[tuple[int, int]]) -> None:
        """The live view: newest live generation, snapshots with exclusions, and
        (generation, SNAP_* flags) of every snapshot."""
