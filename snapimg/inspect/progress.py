"""A one-line progress bar on a terminal, for work that takes longer than a second.

Silent when the stream is not a TTY, and during the first second, so quick runs and
pipelines never see it.  The line is erased when the work ends.
"""

from __future__ import annotations

import time
from typing import TextIO

from snapimg.units import format_size

_DELAY = 1.0
_INTERVAL = 0.1
_WIDTH = 30


class Progress:
    def __init__(self, total: int, stream: TextIO, label: str) -> None:
        self._total = max(total, 1)
        self._stream = stream
        self._label = label
        self._enabled = stream.isatty()
        self._start = time.monotonic()
        self._last = 0.0
        self.shown = False

    def __call__(self, done: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._start < _DELAY or now - self._last < _INTERVAL:
            return
        self._last = now
        frac = min(1.0, done / self._total)
        bar = "#" * int(frac * _WIDTH)
        rate = done / (now - self._start)
        self._stream.write(
            f"\r{self._label} [{bar:<{_WIDTH}}] {frac * 100:5.1f}% "
            f"{format_size(done)} / {format_size(self._total)}  {format_size(int(rate))}/s"
        )
        self._stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
