"""The frozen window: freeze the guest's filesystems, run the body (take the snapshot), thaw.

    with quiesced(qga=Path("/run/vm1.qga"), timeout=10) as window:
        create_snapshot()                      # the guest's filesystems are frozen here
    window.frozen_ms                           # freeze sent -> thaw answered, milliseconds

Guarantees:

* nothing is frozen unless the agent answered a guest-sync first (an agent that does not
  answer is one QgaTimeoutError, and the guest is left as it was);
* a guest that is frozen already (by another tool, or by a snapimg that was killed) is not
  frozen again nor thawed: that is refused, naming ``snapimg thaw`` (found by asking the
  agent's status first, or, through libvirt, by the agent's refusal of the freeze);
* the thaw runs on every path out of the window: the body's error, a freeze that failed or
  timed out (the thaw then goes out in the same write as the resync, queued behind the
  freeze), SIGINT, SIGTERM, SIGHUP, and a body that does not finish within ``timeout``
  seconds (SIGALRM).  Once the thaw is next, those signals are only recorded, so a second
  Ctrl-C cannot cut it short; KeyboardInterrupt is raised after it.  Only SIGKILL (or a host
  crash) leaves the guest frozen: ``snapimg thaw`` recovers it.

Signal handling and the alarm are installed only when called from the main thread.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from snapimg.errors import QgaError, QgaTimeoutError, SnapimgError
from snapimg.qga.freezers import LIBVIRT_URI, Freezer, open_freezer

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RECOVERY_FACTOR = 3  # a thaw queued behind a freeze that timed out waits this many timeouts


@dataclass
class FrozenWindow:
    """What one quiesce measured.  Times in milliseconds; ``frozen_ms`` is the whole window
    from the freeze request to the thaw's answer: the longest any guest write was held."""

    filesystems: int = 0  # frozen by the agent
    thawed: int | None = None  # thawed by our thaw (None: the thaw failed)
    freeze_ms: float | None = None  # freeze request -> its answer (includes the guest's sync)
    body_ms: float | None = None  # the snapshot, while frozen
    thaw_ms: float | None = None  # thaw request -> its answer
    frozen_ms: int | None = None  # freeze request -> thaw answered, rounded up

    def to_json(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "quiesced": self.frozen_ms is not None,
            "frozen_ms": self.frozen_ms,
            "filesystems_frozen": self.filesystems,
            "freeze_ms": ms(self.freeze_ms),
            "snapshot_ms": ms(self.body_ms),
            "thaw_ms": ms(self.thaw_ms),
        }


class _Alarm(BaseException):
    """The body outlived the timeout (raised from the SIGALRM handler; a BaseException so
    that no ``except Exception`` in the body swallows it)."""


class _SignalGuard:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt and SIGALRM raises _Alarm while the
    guard is *raising*; once :meth:`hold` is called (the thaw is next) they are only
    recorded, and :attr:`deferred` says whether one came.  Inactive outside the main thread
    (Python runs signal handlers there only)."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.raising = True
        self.deferred = False
        self._saved: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.raising:
            self.deferred = self.deferred or signum != signal.SIGALRM
            return
        if signum == signal.SIGALRM:
            raise _Alarm
        raise KeyboardInterrupt

    def arm(self, seconds: float) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def hold(self) -> None:
        self.raising = False
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __enter__(self) -> _SignalGuard:
        if self.active:
            for sig in (*SIGNALS, signal.SIGALRM):
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in self._saved.items():
                signal.signal(sig, handler)


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000


@contextlib.contextmanager
def frozen(freezer: Freezer, timeout: float = 10.0) -> Iterator[FrozenWindow]:
    """Freeze through ``freezer`` around the body (see the module doc)."""
    if freezer.status() == "frozen":
        raise _frozen_already(freezer)
    window = FrozenWindow()
    with _SignalGuard() as guard:
        began = time.monotonic()
        body_began: float | None = None
        pending: BaseException | None = None
        try:
            try:
                window.filesystems = freezer.freeze(timeout)
                window.freeze_ms = _ms(began)
                guard.arm(timeout)
                body_began = time.monotonic()
                yield window
            finally:
                guard.hold()  # from here on a signal cannot stop the thaw
        except _Alarm:
            pending = QgaTimeoutError(
                f"the snapshot was not taken within {timeout:g} s of the freeze (see "
                f"--quiesce-timeout); the guest was thawed",
                where=freezer.where,
            )
        except QgaError as err:
            if body_began is None and _refused_as_frozen(err):  # someone else's freeze:
                raise _frozen_already(freezer) from None  # not ours to thaw
            pending = err
        except BaseException as err:
            pending = err
        if body_began is not None:
            window.body_ms = _ms(body_began)
        # after a freeze that failed or was cut short, the thaw waits behind it in the agent
        thaw_timeout = timeout if body_began is not None else timeout * RECOVERY_FACTOR
        failure = _thaw(freezer, window, thaw_timeout, pending)
        if failure is None:
            window.frozen_ms = math.ceil(_ms(began))
    if failure is not None:
        raise failure from pending
    if isinstance(pending, QgaError) and body_began is None:  # the freeze failed
        raise type(pending)(
            f"{pending.desc}; the guest was thawed",
            command=pending.command,
            error_class=pending.error_class,
            where=pending.where,
        ) from None
    if pending is not None:
        raise pending
    if guard.deferred:  # a signal during the thaw: act on it now
        raise KeyboardInterrupt


def _frozen_already(freezer: Freezer) -> QgaError:
    return QgaError(
        f"the guest's filesystems are frozen already (by another tool, or a "
        f"snapimg that was killed): thaw them first with '{freezer.thaw_hint}'",
        where=freezer.where,
    )


def _refused_as_frozen(err: QgaError) -> bool:
    """The agent answered the freeze with "Command guest-fsfreeze-freeze has been disabled:
    the agent is in frozen state": the freeze is someone else's.  Every other failed freeze
    (a filesystem that would not freeze, a timeout) is followed by our thaw."""
    return not isinstance(err, QgaTimeoutError) and "frozen state" in err.desc


def _thaw(
    freezer: Freezer, window: FrozenWindow, timeout: float, pending: BaseException | None
) -> QgaError | None:
    """Thaw; the error to raise instead of ``pending`` when that failed."""
    began = time.monotonic()
    try:
        window.thawed = freezer.thaw(timeout)
    except QgaError as err:
        before = f"{_brief(pending)}; then " if isinstance(pending, SnapimgError) else ""
        return QgaError(
            f"{before}the thaw failed ({_brief(err)}): the guest may still be "
            f"frozen; run '{freezer.thaw_hint}'",
            where=freezer.where,
        )
    window.thaw_ms = _ms(began)
    return None


def _brief(err: SnapimgError) -> str:
    """An error's text without the agent's location (the message names it once)."""
    if not isinstance(err, QgaError):
        return str(err)
    return ": ".join(part for part in (err.command, err.error_class, err.desc) if part)


@contextlib.contextmanager
def quiesced(
    qga: Path | None = None,
    libvirt_domain: str | None = None,
    *,
    timeout: float = 10.0,
    libvirt_uri: str = LIBVIRT_URI,
) -> Iterator[FrozenWindow]:
    """Freeze the guest behind agent socket ``qga`` (or libvirt domain ``libvirt_domain``)
    for the body; the yielded :class:`FrozenWindow` is complete once the block is left."""
    try:
        freezer = open_freezer(
            qga=qga, libvirt_domain=libvirt_domain, libvirt_uri=libvirt_uri, timeout=timeout
        )
    except QgaTimeoutError as err:
        raise QgaTimeoutError(
            f"{err.desc} (is qemu-guest-agent running in the guest?); nothing was frozen",
            command=err.command,
            where=err.where,
        ) from None
    try:
        with frozen(freezer, timeout) as window:
            yield window
    finally:
        freezer.close()


def thaw(
    qga: Path | None = None,
    libvirt_domain: str | None = None,
    *,
    timeout: float = 10.0,
    libvirt_uri: str = LIBVIRT_URI,
) -> int:
    """Thaw a guest left frozen (``snapimg thaw``); how many filesystems were thawed."""
    freezer = open_freezer(
        qga=qga, libvirt_domain=libvirt_domain, libvirt_uri=libvirt_uri, timeout=timeout
    )
    try:
        return freezer.thaw(timeout)
    finally:
        freezer.close()
