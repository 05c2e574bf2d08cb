"""Sizes ("64K", "1G", "4096") and other small shared parsing."""

from __future__ import annotations

import re

from snapimg.errors import UsageError

MAX_BYTES = (1 << 63) - 1  # the largest file offset (off_t) and the largest size accepted
_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


# Shown in --help once and referred to by every SIZE option.
SIZE_SYNTAX = (
    "SIZE is a byte count with an optional binary suffix K, M, G, T or P "
    "(KiB, MiB, ... and K/KB alike mean 1024): 65536, 64K and 64KiB are the same"
)


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``text`` as a byte count with an optional binary suffix (K, M, G, T, P).

    ``"64K"``, ``"64KiB"`` and ``"65536"`` all give 65536.  Raises :class:`UsageError`
    naming ``what`` on anything else, and on counts above :data:`MAX_BYTES`.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a number with optional K/M/G/T suffix")
    n = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    check_bytes(n, what, text)
    return n


def check_bytes(n: int, what: str, shown: object = None) -> None:
    """Refuse a byte count or offset that is negative or does not fit a file offset."""
    if not 0 <= n <= MAX_BYTES:
        raise UsageError(
            f"bad {what} {shown if shown is not None else n!r}: "
            f"must be from 0 to {MAX_BYTES} (8 EiB - 1)"
        )


def check_max_size(max_size: int, block_size: int) -> None:
    """A snapshot's store limit must hold at least one block (and fit a file offset)."""
    check_bytes(max_size, "max size")
    if max_size < block_size:
        raise UsageError(
            f"max size {max_size} bytes is below one block ({block_size} bytes): "
            "the snapshot could not preserve a single block"
        )


def count(n: int, word: str, plural: str | None = None) -> str:
    """``count(1, "block")`` -> ``"1 block"``, ``count(2, "block")`` -> ``"2 blocks"``."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


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
