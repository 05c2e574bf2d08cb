"""Reading a snapshot or the origin range by range and comparing it with its model (the
lifecycle's whole and partial reads during the run, and the checks at its end)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import nbd

from tests.soak.clients import first_difference
from tests.soak.model import Actor, SnapModel, World

CHUNK = 4 << 20


def released_runs(s: SnapModel, off: int, end: int, bs: int) -> Iterator[tuple[int, int, bool]]:
    """[off, end) cut where blocks turn from released to not and back."""
    pos = off
    while pos < end:
        released = pos // bs in s.released
        nxt = pos
        while nxt < end and (nxt // bs in s.released) == released:
            nxt = min(end, (nxt // bs + 1) * bs)
        yield pos, nxt, released
        pos = nxt


def read(actor: Actor, h: nbd.NBD, n: int, off: int, what: str) -> tuple[bytes | None, int | None]:
    try:
        with actor.doing(what):
            return h.pread(n, off), None
    except nbd.Error as err:
        return None, err.errnum or -1


def check_snapshot(
    w: World, actor: Actor, s: SnapModel, h: nbd.NBD, off: int, end: int, what: str
) -> str:
    """Read [off, end) of ``s`` (its guard held shared) in 4 MiB requests and compare:
    "ok", "invalid" (EIO, and the server lists it invalid as its model allows) or "bad"
    (a violation, recorded).  Of each released run one request is made: it must fail."""
    bs = w.bs
    if s.invalid_since is not None:
        _, err = read(actor, h, min(bs, end - off), off, f"{what}: invalid {s.export}")
        if err != errno.EIO:
            w.violations.add("invalid", f"{what}: invalid {s.export} answered {err}, not EIO")
            return "bad"
        return "invalid"
    for lo, hi, released in released_runs(s, off, end, bs):
        if released:
            _, err = read(actor, h, min(bs, hi - lo), lo, f"{what}: released {s.export}")
            if err != errno.EIO:
                w.violations.add("released", f"{what}: {s.export} released [{lo}, {hi}) "
                                 f"answered {err}, not EIO")  # fmt: skip
                return "bad"
            w.stats.expected("eio_released")
            continue
        for pos in range(lo, hi, CHUNK):
            n = min(CHUNK, hi - pos)
            ranges: AbstractContextManager[None] = (
                s.ranges.hold(pos, pos + n, False) if s.writable else nullcontext()
            )
            with ranges:
                data, err = read(actor, h, n, pos, f"{what}: {s.export} [{pos}, +{n})")
                if err == errno.EIO:
                    return "invalid" if w.confirm_invalid(s, what) else "bad"
                if err is not None or data is None:
                    w.violations.add("error", f"{what}: {s.export} [{pos}, +{n}): {err}")
                    return "bad"
                if memoryview(s.data)[pos : pos + n] != data:
                    at = pos + first_difference(s.data[pos : pos + n], data)
                    w.violations.add("data", f"{what}: {s.export} differs at {at}")
                    return "bad"
            w.stats.op("snap_check_read", read=n)
    return "ok"


def check_origin(w: World, actor: Actor, h: nbd.NBD, what: str) -> bool:
    """The whole origin over NBD equals its model (no writer running)."""
    for pos in range(0, w.size, CHUNK):
        n = min(CHUNK, w.size - pos)
        data, err = read(actor, h, n, pos, f"{what}: disk [{pos}, +{n})")
        if err is not None or data is None:
            w.violations.add("error", f"{what}: disk [{pos}, +{n}): {err}")
            return False
        if memoryview(w.origin)[pos : pos + n] != data:
            at = pos + first_difference(w.origin[pos : pos + n], data)
            w.violations.add("data", f"{what}: the origin differs from its model at {at}")
            return False
    return True
