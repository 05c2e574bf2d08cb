"""The two locks that keep the soak's models exact while eight clients run at once.

* :class:`RangeLock`: byte ranges of one export held shared (reads, block status) or
  exclusive (writes).  Two clients may write different bytes of the same engine block at
  once (the copy-before-write race worth testing), never the same bytes: the result of
  two overlapping writes in flight is undefined, so a model could not predict it.
* :class:`SharedExclusive`: a readers-writer lock preferring the exclusive side.  The
  origin's *gate*: every origin write holds it shared from before it is sent until the
  model records its acknowledgement; snapshot creation (and a backup until its snapshot
  exists) holds it exclusively, so no write is in flight and the model's copy of the
  origin is exactly what the snapshot must read.  Each snapshot's *guard*: its I/O holds
  it shared, release and drop exclusively.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RangeLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int, bool]] = []

    def _conflicts(self, lo: int, hi: int, exclusive: bool) -> bool:
        return any(a < hi and lo < b and (exclusive or ex) for a, b, ex in self._held)

    @contextmanager
    def hold(self, lo: int, hi: int, exclusive: bool) -> Iterator[None]:
        entry = (lo, hi, exclusive)
        with self._cond:
            while self._conflicts(lo, hi, exclusive):
                self._cond.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()


class SharedExclusive:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive waiters: new shared holders wait behind them

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
