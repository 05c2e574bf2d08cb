"""Slot allocation in the store's data area: every request gets consecutive slots, from
the smallest freed run that holds them all (best fit), else at the end of the area.

A run of blocks is copied with one call per run of slots it lands in, and a clone
(FICLONERANGE) of a few blocks costs about as much as one of a whole run: so a request
is never split over freed pieces.  Freed pieces smaller than a request stay for smaller
ones; their space was given back (hole punched), so growing the area instead costs file
size, not disk space.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort


class SlotAllocator:
    def __init__(self, end: int = 0) -> None:
        self.end = end  # slots [0, end) exist in the data area
        self._starts: list[int] = []  # free runs, merged and sorted
        self._ends: list[int] = []
        self._by_size: list[tuple[int, int]] = []  # the same runs as (count, start), sorted

    @property
    def free_count(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def alloc(self, n: int) -> list[tuple[int, int]]:
        """``n`` consecutive slots, as a list of one (first slot, count) run."""
        k = bisect_left(self._by_size, (n, -1))
        if k == len(self._by_size):
            start = self.end
            self.end += n
            return [(start, n)]
        count, start = self._by_size.pop(k)
        i = bisect_left(self._starts, start)
        if count == n:
            del self._starts[i], self._ends[i]
        else:
            self._starts[i] = start + n
            insort(self._by_size, (count - n, start + n))
        return [(start, n)]

    def free(self, start: int, count: int = 1) -> None:
        end = start + count
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True):
            del self._by_size[bisect_left(self._by_size, (e - s, s))]
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        if end == self.end:  # free runs that reach the end of the area shrink it instead
            del self._starts[i:j], self._ends[i:j]
            self.end = start
            return
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        insort(self._by_size, (end - start, start))

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
