"""The progress bar draws on a terminal only."""

from __future__ import annotations

import io

from snapimg.progress import Progress


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
    assert text.endswith("\n")
    last = text.rstrip("\n").split("\r\x1b[K")[-1]
    assert last.startswith("backup b0001 [############------------] 2.0 MiB / 4.0 MiB")
    assert "/s  ETA 0:" in last
