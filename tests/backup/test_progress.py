"""The progress bar: silent unless enabled; terminal escapes only on a terminal."""

from __future__ import annotations

import io

from snapimg.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("backup b0001", 4 << 20, stream=out)
    bar.add(1 << 20)
    bar.finish()
    assert out.getvalue() == ""


def test_draws_bytes_rate_and_eta_when_enabled() -> None:
    out = io.StringIO()
    bar = Progress("backup b0001", 4 << 20, stream=out, enabled=True, hz=1e9)
    bar.add(1 << 20)
    bar.add(1 << 20)
    bar.finish()
    text = out.getvalue()
    assert text.endswith("\n") and "\x1b" not in text
    lines = text.rstrip("\n").split("\r")
    assert lines[-1].startswith("backup b0001 [############------------] 2.0 MiB / 4.0 MiB")
    assert "/s  ETA 0:" in lines[-1]
    assert lines[-2] == " " * len(lines[-1])  # the previous line blanked out


def test_on_a_terminal_by_default_with_line_clearing() -> None:
    out = _Terminal()
    bar = Progress("restore b0002", 2 << 20, stream=out, hz=1e9)
    bar.add(2 << 20)
    bar.finish()
    assert out.getvalue().startswith("\r\x1b[Krestore b0002 [########################]")
