"""One soak client: its own NBD connections (libnbd), random requests, every reply
checked against the models of :mod:`tests.soak.model`.

Requests: writes (some FUA), write-zeroes (with and without NO_HOLE), trims, flushes,
reads and block status of the origin; reads and block status of any live snapshot;
writes, zeroes and trims (= releases) of writable snapshots; now and then a reconnect.
Offsets anywhere (a fifth of them in a hot window at the image's end, so clients meet on
the same blocks, partial last block included), aligned to nothing, 512 or the block
size; lengths from 1 byte to 1 MiB.
"""

from __future__ import annotations

import contextlib
import errno
import random
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import nbd

from tests.soak.model import (
    ORIGIN,
    Actor,
    SnapModel,
    World,
    blocks_of,
    connect,
    disconnect,
    extents,
    untruthful_zero,
    whole_blocks,
)

MiB = 1 << 20
HOT = MiB
SNAP_CONNECTIONS = 2  # per client: a bounded number of connections in the steady state
WEIGHTS = {
    "write": 28, "read": 22, "zero": 5, "trim": 4, "flush": 2, "block_status": 5,
    "snap_read": 16, "snap_block_status": 3, "snap_write": 8, "snap_zero": 2,
    "snap_trim": 0.5, "reconnect": 0.5,
}  # fmt: skip


class Failed(Exception):
    """A request failed in a way no model allows (already recorded as a violation)."""


def first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    va, vb = memoryview(a), memoryview(b)
    lo, hi = 0, min(len(va), len(vb))
    while hi - lo > 64:  # bisect on equal prefixes
        mid = (lo + hi) // 2
        if va[lo:mid] == vb[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if va[i] != vb[i]:
            return i
    return hi


class Client(threading.Thread, Actor):
    def __init__(self, world: World, index: int, seed: int) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.w = world
        self.index = index
        self.rnd = random.Random(seed)
        self.structured = index % 4 != 3  # one client in four without structured replies
        self.origin_h: nbd.NBD | None = None
        self.snap_h: OrderedDict[str, tuple[SnapModel, nbd.NBD]] = OrderedDict()
        self.kinds = list(WEIGHTS)
        self.weights = list(WEIGHTS.values())

    # -- plumbing --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.w.stop.is_set() and not self.w.abort.is_set():
                self.step(self.rnd.choices(self.kinds, self.weights)[0])
        except BaseException:
            if not self.w.abort.is_set():
                self.w.violations.add("client", f"{self.name}: {traceback.format_exc()}")
        finally:
            self.close()

    def close(self) -> None:
        if self.origin_h is not None:
            disconnect(self.origin_h)
            self.origin_h = None
        for name in list(self.snap_h):
            self.close_snap(name)

    def close_snap(self, name: str) -> None:
        s, h = self.snap_h.pop(name)
        disconnect(h)
        with contextlib.suppress(ValueError):  # a drop may have cleared the list
            s.handles.remove(h)

    def origin(self) -> nbd.NBD:
        if self.origin_h is None:
            self.origin_h = connect(self.w.socket, ORIGIN, self.structured)
        return self.origin_h

    def snap_handle(self, s: SnapModel) -> nbd.NBD:
        """The connection to ``s`` (guard held, not dropped); at most SNAP_CONNECTIONS
        are kept, the least recently used is closed."""
        if s.snap in self.snap_h:
            self.snap_h.move_to_end(s.snap)
            return self.snap_h[s.snap][1]
        if len(self.snap_h) >= SNAP_CONNECTIONS:
            self.close_snap(next(iter(self.snap_h)))
        h = connect(self.w.socket, s.export, self.structured)
        self.snap_h[s.snap] = (s, h)
        s.handles.append(h)
        return h

    def forget_dropped(self) -> None:
        for name in [n for n, (s, _) in self.snap_h.items() if s.dropped]:
            del self.snap_h[name]  # the drop disconnected it

    def call(self, what: str, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        """(result, None) or (None, errno) of one request; a lost connection or an error
        without errno is a violation (and the connection is made again)."""
        try:
            with self.doing(what):
                return fn(), None
        except nbd.Error as err:
            if err.errnum in (None, 0, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                if not self.w.abort.is_set():
                    self.w.violations.add("connection", f"{self.name} {what}: {err}")
                self.close()
                raise Failed(what) from None
            return None, err.errnum

    def span(self) -> tuple[int, int]:
        size, bs, rnd = self.w.size, self.w.bs, self.rnd
        if rnd.random() < 0.2:
            off = max(0, size - HOT) + rnd.randrange(min(HOT, size))
        else:
            off = rnd.randrange(size)
        align = rnd.random()
        if align < 0.25:
            off -= off % 512
        elif align < 0.45:
            off -= off % bs
        r = rnd.random()
        if r < 0.3:
            n = rnd.randint(1, 4096)
        elif r < 0.6:
            n = rnd.randint(4097, 2 * bs)
        elif r < 0.9:
            n = rnd.choice([512, 4096, bs, 2 * bs]) * rnd.randint(1, 4)
        else:
            n = rnd.randint(1, MiB)
        return off, min(n, size - off)

    def step(self, kind: str) -> None:
        self.forget_dropped()
        try:
            if kind in ("write", "zero", "trim"):
                self.origin_write(kind)
            elif kind == "read":
                self.origin_read()
            elif kind == "block_status" and self.structured:
                self.origin_block_status()
            elif kind == "flush":
                _, err = self.call("flush disk", lambda: self.origin().flush())
                self.check_ok(err, "flush disk")
                self.w.stats.op("flush")
            elif kind == "reconnect":
                self.close()
                self.w.stats.op("reconnect")
            elif kind in ("snap_read", "snap_block_status"):
                live = self.w.live()
                if live:
                    self.snap_read(self.rnd.choice(live), kind)
            elif kind in ("snap_write", "snap_zero", "snap_trim"):
                writable = [s for s in self.w.live() if s.writable]
                if writable:
                    self.snap_write(self.rnd.choice(writable), kind)
        except Failed:
            pass

    def check_ok(self, err: int | None, what: str) -> None:
        if err is not None:
            self.w.violations.add("error", f"{self.name} {what}: {errno.errorcode.get(err, err)}")
            raise Failed(what)

    # -- the origin ------------------------------------------------------------------------

    def origin_write(self, kind: str) -> None:
        w, rnd = self.w, self.rnd
        off, n = self.span()
        fua = nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0
        data: bytes
        if kind == "write":
            data = rnd.randbytes(n)
            flags = fua

            def request() -> None:
                self.origin().pwrite(data, off, flags)
        elif kind == "zero":
            data = bytes(n)
            flags = fua | (nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)

            def request() -> None:
                self.origin().zero(n, off, flags)
        else:
            data = bytes(n)
            flags = fua

            def request() -> None:
                self.origin().trim(n, off, flags)

        what = f"{kind} disk [{off}, +{n}) flags={flags}"
        with w.gate.shared():
            refusable = w.writes_may_be_refused()
            with w.origin_ranges.hold(off, off + n, True):
                w.trace(f"{self.name} start {what}")
                _, err = self.call(what, request)
                w.trace(f"{self.name} done {what}: {err}")
                if err is None:
                    w.origin[off : off + n] = data
                    w.stats.op(kind, written=n)
                    return
        if err == errno.ENOSPC and refusable:
            w.stats.expected("enospc_origin_write")
        else:
            self.check_ok(err, what)

    def origin_read(self) -> None:
        off, n = self.span()
        what = f"read disk [{off}, +{n})"
        with self.w.origin_ranges.hold(off, off + n, False):
            data, err = self.call(what, lambda: self.origin().pread(n, off))
            self.check_ok(err, what)
            if memoryview(self.w.origin)[off : off + n] != data:
                at = off + first_difference(self.w.origin[off : off + n], data)
                self.w.violations.add("data", f"{self.name} {what}: differs at {at}")
        self.w.stats.op("read", read=n)

    def origin_block_status(self) -> None:
        off, n = self.span()
        what = f"block status disk [{off}, +{n})"
        with self.w.origin_ranges.hold(off, off + n, False):
            entries, err = self.call(what, lambda: extents(self.origin(), off, n))
            self.check_ok(err, what)
            wrong = untruthful_zero(entries, off, n, self.w.origin, set(), self.w.bs)
        if wrong:
            self.w.violations.add("block_status", f"{self.name} {what}: {wrong}")
        self.w.stats.op("block_status")

    # -- snapshots -------------------------------------------------------------------------

    def snap_read(self, s: SnapModel, kind: str) -> None:
        if kind == "snap_block_status" and not self.structured:
            kind = "snap_read"
        off, n = self.span()
        what = f"{kind} {s.export} [{off}, +{n})"
        ranges: AbstractContextManager[None] = (
            s.ranges.hold(off, off + n, False) if s.writable else nullcontext()
        )
        with s.guard.shared():
            if s.dropped:
                return
            h = self.snap_handle(s)
            t0 = time.monotonic()
            with ranges:
                if kind == "snap_read":
                    got, err = self.call(what, lambda: h.pread(n, off))
                else:
                    got, err = self.call(what, lambda: extents(h, off, n))
                blocked = blocks_of(off, n, self.w.bs) & s.released
                if err is None and kind == "snap_read" and not blocked:
                    if s.invalid_since is not None and s.invalid_since < t0:
                        self.w.violations.add("invalid", f"{self.name} {what}: data from an "
                                              "invalid snapshot")  # fmt: skip
                    elif memoryview(s.data)[off : off + n] != got:
                        at = off + first_difference(s.data[off : off + n], got)
                        self.w.violations.add("data", f"{self.name} {what}: differs at {at}")
                elif err is None and kind == "snap_block_status":
                    wrong = untruthful_zero(got, off, n, s.data, s.released, self.w.bs)
                    # an invalidated snapshot's blocks are no longer copied: then the
                    # origin's holes may show through, and any answer is acceptable
                    if wrong and not self.w.invalid_now(s, f"{self.name} {what}"):
                        self.w.violations.add("block_status", f"{self.name} {what}: {wrong}")
            self.snap_outcome(s, what, err, bool(blocked) and kind == "snap_read")
        self.w.stats.op(kind, read=n if kind == "snap_read" and err is None else 0)

    def snap_outcome(self, s: SnapModel, what: str, err: int | None, released: bool) -> None:
        """EIO is right for released blocks and for a snapshot the server may have
        invalidated; data is wrong for released blocks."""
        if released:
            if err != errno.EIO:
                self.w.violations.add("released", f"{self.name} {what}: {err} not EIO")
            else:
                self.w.stats.expected("eio_released")
        elif err == errno.EIO and self.w.confirm_invalid(s, f"{self.name} {what}"):
            self.w.stats.expected("eio_invalid")
        elif err is not None and err != errno.EIO:
            self.check_ok(err, what)

    def snap_write(self, s: SnapModel, kind: str) -> None:
        off, n = self.span()
        data = self.rnd.randbytes(n) if kind == "snap_write" else bytes(n)
        fua = nbd.CMD_FLAG_FUA if self.rnd.random() < 0.2 else 0
        what = f"{kind} {s.export} [{off}, +{n}) flags={fua}"
        guard = s.guard.exclusive() if kind == "snap_trim" else s.guard.shared()
        with guard:
            if s.dropped:
                return
            h = self.snap_handle(s)
            with s.ranges.hold(off, off + n, True):
                if kind == "snap_write":
                    _, err = self.call(what, lambda: h.pwrite(data, off, fua))
                elif kind == "snap_zero":
                    _, err = self.call(what, lambda: h.zero(n, off, fua))
                else:
                    _, err = self.call(what, lambda: h.trim(n, off))
                blocked = kind != "snap_trim" and bool(blocks_of(off, n, self.w.bs) & s.released)
                if err is None and kind == "snap_trim":
                    s.released.update(whole_blocks(off, n, self.w.size, self.w.bs))
                elif err is None:
                    assert isinstance(s.data, bytearray)
                    s.data[off : off + n] = data
                elif err == errno.ENOSPC and s.max_size is not None and kind != "snap_trim":
                    self.partly_written(s, h, off, data, what)
                    return
            self.snap_outcome(s, what, err, blocked)
        self.w.stats.op(kind, written=n if err is None and kind != "snap_trim" else 0)

    def partly_written(self, s: SnapModel, h: nbd.NBD, off: int, data: bytes, what: str) -> None:
        """A writable snapshot reached its own max size part way through a write: the
        blocks before the one that did not fit hold the new data, the rest the old.
        (Guard and range held.)"""
        n, bs = len(data), self.w.bs
        got, err = self.call(f"read back {what}", lambda: h.pread(n, off))
        if err == errno.EIO and self.w.confirm_invalid(s, f"{self.name} read back {what}"):
            return
        self.check_ok(err, f"read back {what}")
        old = bytes(s.data[off : off + n])
        cuts = [off, *range((off // bs + 1) * bs, off + n, bs)]
        if not any(got == data[: c - off] + old[c - off :] for c in cuts):
            self.w.violations.add(
                "data", f"{self.name} {what}: ENOSPC, and the range holds neither a block "
                "prefix of the write nor the old data",
            )  # fmt: skip
            return
        assert isinstance(s.data, bytearray)
        s.data[off : off + n] = got
        self.w.stats.expected("enospc_snapshot_write")
