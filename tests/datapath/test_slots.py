"""The C slot allocator (``snapimg._datapath.Slots``) against the Python reference
(``snapimg.engine.slots.SlotAllocator``): the same answers for the same calls.

Freeing the last slots of an allocator with no free run took ``&runs[0]`` of a NULL
array: clang's UBSan reports "applying zero offset to null pointer" (found by the
transmission-compiled fuzz target; the
input is in tests/fuzz/corpus/transmission, which tests/fuzz/test_compiled.py runs under
the clang-built sanitizers; gcc's UBSan, which scripts/sanitize.sh uses, has no such
check).
"""

from __future__ import annotations

import random

import pytest

from snapimg.engine import compiled
from snapimg.engine.slots import SlotAllocator

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason="the C extension snapimg._datapath is not built"
)


def test_freeing_the_tail_of_an_allocator_without_runs() -> None:
    from snapimg._datapath import Slots

    s = Slots()
    assert s.alloc(1) == [(0, 1)]
    s.free(0)  # no run yet: the area shrinks
    assert s.end == 0 and s.runs() == [] and s.free_count == 0
    s = Slots(4)
    s.free(3)
    assert s.end == 3 and s.runs() == []


@pytest.mark.parametrize("seed", range(20))
def test_same_answers_as_the_python_allocator(seed: int) -> None:
    from snapimg._datapath import Slots

    rnd = random.Random(seed)
    start = rnd.choice([0, 0, 5, 64])
    c, py = Slots(start), SlotAllocator(start)
    held: list[int] = list(range(start))
    for _ in range(400):
        if held and rnd.random() < 0.45:
            slot = held.pop(rnd.randrange(len(held)))
            c.free(slot)
            py.free(slot)
        else:
            n = rnd.choice([1, 1, 2, 3, 8])
            got = c.alloc(n)
            assert got == py.alloc(n)
            held += [s for first, count in got for s in range(first, first + count)]
        assert (c.end, c.runs(), c.free_count) == (py.end, py.runs(), py.free_count)
