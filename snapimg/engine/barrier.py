"""A readers-writer barrier: I/O runs shared, snapshot lifecycle changes run exclusive
(waiting for I/O in flight and holding new I/O until they finish).

The shared side is on every I/O request, so it is two plain lock round trips when no
exclusive holder is around, with no generator or notification on that path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class BarrierContexts:
    """``shared()`` and ``exclusive()`` context managers over a barrier's
    ``acquire_*``/``release_*`` methods (this Python barrier, or the compiled one)."""

    def acquire_shared(self) -> None:
        raise NotImplementedError

    def release_shared(self) -> None:
        raise NotImplementedError

    def acquire_exclusive(self) -> None:
        raise NotImplementedError

    def release_exclusive(self) -> None:
        raise NotImplementedError

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class Barrier(BarrierContexts):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive waiters get priority over new shared holders

    def acquire_shared(self) -> None:
        with self._lock:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._lock:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._lock:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._lock:
            self._exclusive = False
            self._cond.notify_all()
