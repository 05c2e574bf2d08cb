"""Store work that a writer waits for at most so long (``cbw_timeout``).

A stalled store (a frozen or hung file system) blocks the system calls that copy a
block into it or append to its log, and nothing can interrupt them.  So the data path
runs that work on threads of this runner and waits for its result with a deadline: the
writer moves on (or fails) when the deadline passes, the stuck thread finishes
whenever the store comes back.  The threads are daemons (a stalled store must not
hold up the process's exit) and there are at most ``limit`` of them: when all are
stuck, new work is refused at once instead of piling up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Job(Generic[T]):
    """One piece of work: its outcome once done, and whether its waiter gave up."""

    def __init__(self, fn: Callable[[Job[T]], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.abandoned = False  # the waiter gave up: the work must not publish anything
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self.fn(self)
        except BaseException as err:  # handed to the waiter
            self._error = err
        finally:
            self.done.set()

    def wait(self, timeout: float) -> bool:
        """True when the work finished within ``timeout`` seconds."""
        return self.done.wait(max(timeout, 0.0))

    def result(self) -> T:
        """The work's result, or its exception raised (call after :meth:`wait`)."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class BoundedRunner:
    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._queue: list[Job[object]] = []
        self._idle = 0
        self._threads = 0
        self._wake = threading.Condition(self._lock)

    def submit(self, fn: Callable[[Job[T]], T]) -> Job[T] | None:
        """Start ``fn(job)`` on a runner thread; None when every thread is stuck."""
        job: Job[T] = Job(fn)
        with self._lock:
            if self._idle <= len(self._queue):  # no idle thread left for this job
                if self._threads >= self.limit:
                    return None
                self._threads += 1
                threading.Thread(target=self._work, name="store-io", daemon=True).start()
            self._queue.append(job)  # type: ignore[arg-type]
            self._wake.notify()
        return job

    def busy(self) -> int:
        """Threads running (or stuck in) work right now."""
        with self._lock:
            return self._threads - self._idle

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                while not self._queue:
                    self._wake.wait()
                self._idle -= 1
                job = self._queue.pop(0)
            job.run()
