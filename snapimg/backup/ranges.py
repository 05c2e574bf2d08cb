"""Byte ranges ``(offset, length)``: merging, and the pieces or blocks they touch."""

from __future__ import annotations

from snapimg.digest import PIECE_SIZE

Range = tuple[int, int]


def merge_ranges(ranges: list[Range], size: int) -> list[Range]:
    """Sort, clip to ``size`` and merge overlapping or adjacent ranges."""
    out: list[Range] = []
    for off, n in sorted(ranges):
        end = min(off + n, size)
        if end <= off:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_off + last_n, end) - last_off)
        else:
            out.append((off, end - off))
    return out


def piece_regions(ranges: list[Range], size: int, piece_size: int = PIECE_SIZE) -> list[Range]:
    """The whole pieces that ``ranges`` touch, merged (the last one may end at ``size``)."""
    covered = []
    for off, n in ranges:
        lo = off - off % piece_size
        hi = -(-(off + n) // piece_size) * piece_size
        covered.append((lo, hi - lo))
    return merge_ranges(covered, size)


def count_blocks(ranges: list[Range], block_size: int) -> int:
    """The blocks of ``block_size`` that ``ranges`` touch."""
    bs = max(block_size, 1)
    return sum((off + n + bs - 1) // bs - off // bs for off, n in ranges)
