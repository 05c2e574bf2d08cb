"""Allocation summary: how many bytes of a source are data, known zeroes, or holes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapimg.inspect.source import Source


@dataclass(frozen=True)
class Allocation:
    data: int  # allocated, contents unknown without reading
    zero: int  # allocated (or reported) as reading zeroes, not a hole
    hole: int  # unallocated: reads as zeroes, takes no space

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "zero": self.zero, "hole": self.hole}


def allocation_summary(src: Source) -> Allocation:
    """Totals over the whole source from its allocation map (no data is read)."""
    data = zero = hole = 0
    for _, ext in src.extents():
        if ext.hole:
            hole += ext.length
        elif ext.zero:
            zero += ext.length
        else:
            data += ext.length
    return Allocation(data, zero, hole)
