"""Sizes ("64K", "1G", "4096") and other small shared parsing."""

from __future__ import annotations

import re

from snapimg.errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``text`` as a byte count with an optional binary suffix (K, M, G, T, P).

    ``"64K"``, ``"64KiB"`` and ``"65536"`` all give 65536.  Raises :class:`UsageError`
    naming ``what`` on anything else.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a number with optional K/M/G/T suffix")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def format_size(n: int) -> str:
    """Render a byte count for humans: 65536 -> "64 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_block_size(text: str) -> int:
    """A block size: a power of two from 4 KiB to 1 MiB."""
    n = parse_size(text, "block size")
    check_block_size(n)
    return n


def check_block_size(n: int) -> None:
    if n < 4096 or n > 1 << 20 or n & (n - 1):
        raise UsageError(f"bad block size {n}: must be a power of two from 4K to 1M")
