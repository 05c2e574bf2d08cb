"""A one-line progress bar on a terminal (bytes, rate, ETA); silent anywhere else.

Used by backup/restore (drawn from the start, final line kept) and by checksum/diff
(``delay=1``: only work that takes longer than a second shows a bar; ``erase=True``: the
line is erased at the end).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from snapimg.units import format_size


def _clock(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts bytes against a total; draws at most ``hz`` times a second when enabled.

    Enabled by default only when ``stream`` is a TTY, so pipes, logs and ``--json``
    output stay clean.
    """

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        hz: float = 8.0,
        delay: float = 0.0,
        erase: bool = False,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self._start = time.monotonic()
        self._delay = delay
        self._erase = erase
        self._last_draw = 0.0
        self._interval = 1.0 / hz
        self._drawn = False
        self._width = 0  # of the last line drawn (to blank it out without a terminal)

    def add(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        """Set the bytes done so far (a callback for work that reports absolute progress)."""
        self.done = done
        if self.enabled:
            now = time.monotonic()
            if now - self._start >= self._delay and now - self._last_draw >= self._interval:
                self._last_draw = now
                self._draw(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        width = 24
        filled = min(width, int(frac * width))
        bar = "#" * filled + "-" * (width - filled)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label} [{bar}] {format_size(self.done)} / {format_size(self.total)}"
            f"  {min(frac, 1.0) * 100:.0f}%  {format_size(int(rate))}/s  ETA {_clock(eta)}"
        )

    def _draw(self, now: float) -> None:
        text = self.line(now)
        self.stream.write(self._return() + text)
        self._width = len(text)
        self.stream.flush()
        self._drawn = True

    def _return(self) -> str:
        """Back to the start of the line and clear it (a terminal escape only on a TTY:
        a log of ``-p`` output gets carriage returns, as from ``qemu-img convert -p``)."""
        if self.tty:
            return "\r\x1b[K"
        return "\r" + " " * self._width + "\r" if self._width else "\r"

    def finish(self) -> None:
        if not self.enabled or (self._delay and not self._drawn):
            return  # off, or done before the delay: nothing was ever shown
        if self._erase:
            self.stream.write(self._return())
        else:
            self._draw(time.monotonic())
            self.stream.write("\n")
        self.stream.flush()
