"""Changed block ranges between two sources (images, NBD exports), like ``cmp`` but sparse.

Both allocation maps are walked together: where both sides are holes or known zeroes
nothing is read; where one side is, only the other is read and checked for zeroes; where
both hold data, both are read and compared (NBD sides by read-ahead threads).  A
difference marks its whole ``block_size`` block; adjacent changed blocks merge into one
range.  Bytes past the end of the shorter source count as changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapimg.inspect.readahead import CHUNK, read_ahead
from snapimg.inspect.source import FileSource, Source

_ZEROES = bytes(CHUNK)


@dataclass
class DiffResult:
    size_a: int
    size_b: int
    block_size: int
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in bytes

    @property
    def identical(self) -> bool:
        return not self.ranges and self.size_a == self.size_b

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    @property
    def changed_blocks(self) -> int:
        bs = self.block_size
        return sum((o + n + bs - 1) // bs - o // bs for o, n in self.ranges)

    def to_json(self) -> dict[str, Any]:
        return {
            "size_a": self.size_a,
            "size_b": self.size_b,
            "block_size": self.block_size,
            "identical": self.identical,
            "changed_blocks": self.changed_blocks,
            "changed_bytes": self.changed_bytes,
            "ranges": [{"offset": o, "length": n} for o, n in self.ranges],
        }


class _Blocks:
    """Changed block numbers, appended in increasing order, merged into runs."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []  # [first, end) block numbers

    def add(self, first: int, end: int) -> None:
        if self.runs and first <= self.runs[-1][1]:
            self.runs[-1][1] = max(self.runs[-1][1], end)
        else:
            self.runs.append([first, end])


def _segments(a: Source, b: Source, end: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(offset, length, read_a, read_b) pieces of at most CHUNK bytes over ``[0, end)``."""
    ea, eb = a.extents(0, end), b.extents(0, end)
    oa, xa = next(ea, (end, None))
    ob, xb = next(eb, (end, None))
    pos = 0
    while pos < end and xa is not None and xb is not None:
        stop = min(oa + xa.length, ob + xb.length, pos + CHUNK)
        # a piece never crosses a CHUNK boundary, so reads stay aligned and bounded
        stop = min(stop, (pos // CHUNK + 1) * CHUNK)
        yield pos, stop - pos, not (xa.hole or xa.zero), not (xb.hole or xb.zero)
        pos = stop
        if pos >= oa + xa.length:
            oa, xa = next(ea, (end, None))
        if pos >= ob + xb.length:
            ob, xb = next(eb, (end, None))


def diff_sources(
    a: Source, b: Source, block_size: int, progress: Callable[[int], None] | None = None
) -> DiffResult:
    common = min(a.size, b.size)
    blocks = _Blocks()
    plan = list(_segments(a, b, common))
    # Local files: read in line (comparing is cheap, a thread would only add hand-offs);
    # NBD: a reader thread per side keeps a request in flight while we compare.
    data_a = read_ahead(a, ((o, n) for o, n, ra, _ in plan if ra), _depth(a))
    data_b = read_ahead(b, ((o, n) for o, n, _, rb in plan if rb), _depth(b))
    try:
        for off, n, ra, rb in plan:
            if ra or rb:
                da = next(data_a) if ra else _ZEROES[:n]
                db = next(data_b) if rb else _ZEROES[:n]
                if da != db:
                    _mark(blocks, off, da, db, block_size)
            if progress is not None:
                progress(off + n)
    finally:
        data_a.close()
        data_b.close()
    longer = max(a.size, b.size)
    if longer > common:
        blocks.add(common // block_size, (longer + block_size - 1) // block_size)
    result = DiffResult(a.size, b.size, block_size)
    for first, end in blocks.runs:
        start = first * block_size
        result.ranges.append((start, min(end * block_size, longer) - start))
    return result


def _depth(src: Source) -> int:
    return 0 if isinstance(src, FileSource) else 4


def _mark(blocks: _Blocks, off: int, da: bytes | bytearray, db: bytes | bytearray, bs: int) -> None:
    """Mark the blocks of piece ``off`` whose bytes differ."""
    pos = 0
    n = len(da)
    while pos < n:
        cut = min(n, (off + pos) // bs * bs + bs - off)  # end of this block within the piece
        if da[pos:cut] != db[pos:cut]:
            blk = (off + pos) // bs
            blocks.add(blk, blk + 1)
        pos = cut
