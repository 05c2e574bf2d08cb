"""Slot allocation in the store's data area: freed runs are reused, first fit, then the
area grows at its end."""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class SlotAllocator:
    def __init__(self, end: int = 0) -> None:
        self.end = end  # slots [0, end) exist in the data area
        self._starts: list[int] = []  # free runs, merged and sorted
        self._ends: list[int] = []

    @property
    def free_count(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """``n`` slots as (first slot, count) runs, reusing free runs first."""
        out: list[tuple[int, int]] = []
        while n and self._starts:
            s, e = self._starts[0], self._ends[0]
            take = min(n, e - s)
            out.append((s, take))
            n -= take
            if s + take == e:
                del self._starts[0], self._ends[0]
            else:
                self._starts[0] = s + take
        if n:
            out.append((self.end, n))
            self.end += n
        return out

    def free(self, start: int, count: int = 1) -> None:
        end = start + count
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        # free runs that reach the end of the area shrink it instead
        if self._ends and self._ends[-1] == self.end:
            self.end = self._starts[-1]
            del self._starts[-1], self._ends[-1]

    def runs(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]


def merge_slots(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted (first slot, count) runs covering ``slots``."""
    runs: list[tuple[int, int]] = []
    for s in sorted(slots):
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif not runs or runs[-1][0] + runs[-1][1] < s:
            runs.append((s, 1))
    return runs
