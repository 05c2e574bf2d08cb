"""snapimg.interrupts: what a signal handler's KeyboardInterrupt waits for, and what not.
(The end-to-end case, a real SIGTERM inside subprocess.Popen, is in tests/backup/
test_signals.py.)"""

from __future__ import annotations

import threading

import pytest

from snapimg import interrupts


def test_deliver_is_held_back_to_the_end_of_the_section() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        with interrupts.deferred():  # nested: only the outermost end raises
            interrupts.deliver()
            reached.append("inner")
        reached.append("outer")
    assert reached == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):  # nothing pending is left behind
        interrupts.deliver()
    with interrupts.deferred():
        pass


def test_a_section_in_another_thread_holds_nothing_back() -> None:
    """Handlers run in the main thread: a worker's section must not swallow the interrupt
    (nor raise it in the worker later)."""
    inside, leave = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def worker() -> None:
        try:
            with interrupts.deferred():
                inside.set()
                leave.wait(10)
        except BaseException as err:
            raised.append(err)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(KeyboardInterrupt):
            interrupts.deliver()
    finally:
        leave.set()
        t.join(10)
    assert raised == []
