"""Sections that SIGINT/SIGTERM must not cut in two: starting a child process.

A command's signal handler raises :class:`KeyboardInterrupt` to unwind the command (its
clean-up runs).  Raised inside :class:`subprocess.Popen`, after the fork and before
``Popen`` returns, it would leave a child nobody kills: the caller never got the process
object.  Inside :func:`deferred` a handler calls :func:`deliver`, which only notes the
signal; leaving the section raises then, where the caller holds the process and kills it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Section:
    depth = 0  # nesting of deferred() in the main thread (handlers run there only)
    pending = False


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back :func:`deliver`'s KeyboardInterrupt until the block has ended (in the main
    thread, where handlers run; elsewhere a no-op: the main thread gets the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Section.depth += 1
    try:
        yield
    finally:
        _Section.depth -= 1
    if _Section.depth == 0 and _Section.pending:
        _Section.pending = False
        raise KeyboardInterrupt


def deliver() -> None:
    """For a signal handler: raise KeyboardInterrupt now, or when the section ends."""
    if _Section.depth:
        _Section.pending = True
        return
    raise KeyboardInterrupt
