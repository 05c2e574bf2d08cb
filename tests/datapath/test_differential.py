"""Differential test: the compiled data path against the Python reference.

Two ``snapimg serve`` processes, one per data path, each on its own copy of the same
image, get the same random request streams over several NBD connections each (libnbd):
writes, zeroes and trims at any offset and length, flushes, block status, reads of the
origin and of every snapshot, snapshots created (read-only, writable, with size limits
under either policy), written, released and dropped between requests.  Every reply must
be identical between the two servers and agree with a model of the image and of every
snapshot; at the end the origins are equal and the two stores hold the same records
and the same bytes in every slot those records use.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from snapimg.control.client import ControlClient
from snapimg.engine import compiled
from snapimg.engine.store import DATA, read_store
from snapimg.errors import SnapimgError
from tests.interop.serving import Serve

BS = 4096
SIZE = 96 * BS + 700  # the last block is partial
CONNECTIONS = 3
STEPS = 400

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason="the C extension snapimg._datapath is not built"
)


@dataclass
class Snap:
    data: bytearray
    writable: bool
    released: set[int] = field(default_factory=set)
    valid: bool = True


class Side:
    """One server (one data path) with its NBD connections and its control client."""

    def __init__(self, work: Path, datapath: str, image: bytes) -> None:
        work.mkdir()
        (work / "disk.img").write_bytes(image)
        saved = os.environ.get("SNAPIMG_DATAPATH")
        os.environ["SNAPIMG_DATAPATH"] = datapath
        try:
            self.serve = Serve(work, [f"disk={work / 'disk.img'}"], "--block-size", "4K")
        finally:
            if saved is None:
                del os.environ["SNAPIMG_DATAPATH"]
            else:
                os.environ["SNAPIMG_DATAPATH"] = saved
        assert f"datapath={datapath}" in self.serve.ready_line
        self.work = work
        self.control = ControlClient(self.serve.control)
        self.conns: dict[str, list[nbd.NBD]] = {}

    def handle(self, export: str, i: int) -> nbd.NBD:
        conns = self.conns.setdefault(export, [])
        while len(conns) <= i:
            h = nbd.NBD()
            h.set_export_name(export)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_unix(str(self.serve.socket))
            conns.append(h)
        return conns[i]

    def forget(self, export: str) -> None:
        for h in self.conns.pop(export, []):
            with contextlib.suppress(nbd.Error):  # the server may have cut it already
                h.shutdown()

    def close(self) -> None:
        for export in list(self.conns):
            self.forget(export)
        assert self.serve.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15


def outcome(fn: object) -> tuple[str, object]:
    """What a call did: ("ok", result), ("error", errno) or ("refused", message)."""
    try:
        return "ok", fn()  # type: ignore[operator]
    except nbd.Error as err:
        return "error", err.args[1]
    except SnapimgError as err:
        return "refused", str(err)


def extents(h: nbd.NBD, length: int, offset: int) -> list[int]:
    seen: list[int] = []
    h.block_status(length, offset, lambda meta, off, entries, err: seen.extend(entries) or 0)
    return seen


def blocks_of(off: int, length: int) -> set[int]:
    return set(range(off // BS, (off + length - 1) // BS + 1)) if length else set()


class Differential:
    def __init__(self, tmp: Path, seed: int) -> None:
        self.rnd = random.Random(seed)
        image = bytearray(self.rnd.randbytes(SIZE))
        image[10 * BS : 20 * BS] = bytes(10 * BS)
        self.origin = image
        self.sides = [
            Side(tmp / "python", "python", bytes(image)),
            Side(tmp / "compiled", "compiled", bytes(image)),
        ]
        self.snaps: dict[str, Snap] = {}
        self.counter = 0

    def both(self, export: str, call: str, *args: object) -> tuple[str, object]:
        """The same request on a random connection of each server: same outcome."""
        i = self.rnd.randrange(CONNECTIONS)
        got = [outcome(lambda s=s: getattr(s.handle(export, i), call)(*args)) for s in self.sides]
        assert got[0] == got[1], (export, call, got)
        return got[0]

    def control(self, method: str, **params: object) -> tuple[str, object]:
        got = [outcome(lambda s=s: s.control.call(method, **params)) for s in self.sides]
        if method == "create_snapshot":  # the result holds the creation time and socket
            assert [g[0] for g in got] == [got[0][0]] * 2, got
        else:
            assert got[0] == got[1], (method, params, got)
        return got[0]

    def span(self) -> tuple[int, int]:
        off = self.rnd.randrange(SIZE)
        length = self.rnd.choice([1, 511, 512, BS - 1, BS, BS + 1, 3 * BS + 17, 9000, 40000])
        return off, min(length, SIZE - off)

    # -- requests -------------------------------------------------------------------------

    def write_origin(self) -> None:
        off, length = self.span()
        kind = self.rnd.choice(["write", "write", "write", "zero", "trim"])
        if kind == "write":
            data = self.rnd.randbytes(length)
            got = self.both("disk", "pwrite", data, off, self.rnd.choice([0, nbd.CMD_FLAG_FUA]))
        elif kind == "zero":
            data = bytes(length)
            flags = self.rnd.choice([0, nbd.CMD_FLAG_NO_HOLE])
            got = self.both("disk", "zero", length, off, flags)
        else:
            data = bytes(length)
            got = self.both("disk", "trim", length, off)
        if got[0] == "ok":
            self.origin[off : off + length] = data
        else:  # a snapshot under block-writes reached its max size: nothing written
            assert got == ("error", 28), got

    def write_snapshot(self) -> None:
        names = [n for n, s in self.snaps.items() if s.writable]
        if not names:
            return
        name = self.rnd.choice(names)
        snap = self.snaps[name]
        off, length = self.span()
        data = self.rnd.randbytes(length)
        got = self.both(name, "pwrite", data, off, 0)
        if got[0] == "ok":
            snap.data[off : off + length] = data
        elif snap.valid and not blocks_of(off, length) & snap.released:
            # its own max size reached part way: the reference says what was written
            assert got == ("error", 28), got
            part = self.sides[0].handle(name, 0).pread(length, off)
            snap.data[off : off + length] = part

    def read(self) -> None:
        name = self.rnd.choice(["disk", *self.snaps])
        off, length = self.span()
        got = self.both(name, "pread", length, off)
        if name == "disk":
            assert got == ("ok", bytes(self.origin[off : off + length]))
            return
        snap = self.snaps[name]
        if not snap.valid or blocks_of(off, length) & snap.released:
            assert got == ("error", 5), (name, got)
        else:
            assert got == ("ok", bytes(snap.data[off : off + length])), name

    def block_status(self) -> None:
        """Both servers describe the range truthfully: extents in order from its start,
        never past its end, and whatever they call zero reads as zero.  (They may
        legitimately differ: where the origin file has unwritten extents, ext4's
        SEEK_DATA answers from the page cache, which each path fills differently.)"""
        name = self.rnd.choice(["disk", *self.snaps])
        off, length = self.span()
        i = self.rnd.randrange(CONNECTIONS)
        got = [outcome(lambda s=s: extents(s.handle(name, i), length, off)) for s in self.sides]
        assert got[0][0] == got[1][0], (name, off, length, got)
        if got[0][0] != "ok" or (name != "disk" and not self.snaps[name].valid):
            return
        content = self.origin if name == "disk" else self.snaps[name].data
        released = set() if name == "disk" else self.snaps[name].released
        for _, entries in got:
            assert isinstance(entries, list) and entries
            pos = off
            for n, flags in zip(entries[::2], entries[1::2], strict=True):
                assert n > 0 and pos + n <= off + length, (name, off, length, entries)
                if flags & 2:  # NBD_STATE_ZERO: reads as zero (released blocks read EIO)
                    for b in blocks_of(pos, n) - released:
                        lo, hi = max(pos, b * BS), min(pos + n, (b + 1) * BS)
                        assert content[lo:hi] == bytes(hi - lo), (name, lo, entries)
                pos += n

    # -- lifecycle ------------------------------------------------------------------------

    def create(self) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        limit = self.rnd.choice([None, None, 4 * BS, 16 * BS])
        on_full = self.rnd.choice(["invalidate", "block-writes"])
        writable = self.rnd.random() < 0.3
        got = self.control(
            "create_snapshot", origin="disk", snap=name, max_size=limit, writable=writable,
            on_full=on_full,
        )  # fmt: skip
        assert got[0] == "ok", got
        self.snaps[f"disk@{name}"] = Snap(bytearray(self.origin), writable)

    def drop(self) -> None:
        name = self.rnd.choice(list(self.snaps))
        for s in self.sides:
            s.forget(name)
        assert self.control("drop_snapshot", origin="disk", snap=name[5:])[0] == "ok"
        del self.snaps[name]

    def release(self) -> None:
        name = self.rnd.choice(list(self.snaps))
        b0, n = self.rnd.randrange(SIZE // BS), self.rnd.randrange(1, 4)
        got = self.control("release", origin="disk", snap=name[5:], offset=b0 * BS, length=n * BS)
        if got[0] == "ok":
            self.snaps[name].released.update(range(b0, b0 + n))

    def check_lists(self) -> None:
        """Both servers list the same snapshots, equally valid, equally full."""
        lists = [
            [
                (i.name, i.valid, (i.reason or "").split(" (at ")[0], i.preserved_blocks)
                for i in s.control.list_snapshots()
            ]
            for s in self.sides
        ]
        assert lists[0] == lists[1]
        for name, valid, _, _ in lists[0]:
            if name in self.snaps:
                self.snaps[name].valid = valid

    def step(self) -> None:
        r = self.rnd.random()
        if r < 0.35:
            self.write_origin()
        elif r < 0.6:
            self.read()
        elif r < 0.67:
            self.block_status()
        elif r < 0.72 and len(self.snaps) < 6:
            self.create()
        elif r < 0.75 and self.snaps:
            self.drop()
        elif r < 0.78 and self.snaps:
            self.release()
        elif r < 0.9:
            self.write_snapshot()
        else:
            assert self.both("disk", "flush") == ("ok", None)
        self.check_lists()


def store_state(store: Path) -> tuple[list[object], dict[int, bytes]]:
    """The store's records (times left out) and the bytes of every slot they use."""
    loaded = read_store(store)
    assert loaded is not None
    data = (store / DATA).read_bytes()
    records: list[object] = []
    slots: dict[int, bytes] = {}
    for rec in loaded.checkpoint + loaded.tail:
        fields = {
            k: v
            for k, v in vars(rec).items()
            if k not in ("created", "time", "invalid_time", "fingerprint")  # differ by nature
        }
        if "reason" in fields:
            fields["reason"] = str(fields["reason"]).split(" (at ")[0]
        records.append((type(rec).__name__, fields))
        slot = getattr(rec, "slot", None)
        if slot is not None:
            for k in range(rec.count):  # type: ignore[union-attr]
                slots[slot + k] = data[(slot + k) * BS : (slot + k + 1) * BS]
    return records, slots


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_same_streams_same_results(tmp_path: Path, seed: int) -> None:
    d = Differential(tmp_path, seed)
    try:
        for _ in range(STEPS):
            d.step()
        assert d.counter > 3  # the stream made snapshots
        for name, snap in d.snaps.items():
            got = d.both(name, "pread", SIZE, 0)
            if snap.valid and not snap.released:
                assert got == ("ok", bytes(snap.data)), name
    finally:
        for s in d.sides:
            s.close()
    py, c = (s.work for s in d.sides)
    assert (py / "disk.img").read_bytes() == (c / "disk.img").read_bytes() == bytes(d.origin)
    assert store_state(py / "store") == store_state(c / "store")


def write_until(
    side: Side,
    i: int,
    region: int,
    acked: bytearray,
    lock: threading.Lock,
    stop: threading.Event,
    errors: list[BaseException],
) -> None:
    """Connection ``i`` writes at random into its region; ``acked`` is that region as
    acknowledged (updated under ``lock`` together with the write)."""
    try:
        h = side.handle("disk", i)
        r = random.Random(i)
        while not stop.is_set():
            off = r.randrange(region - 9000)
            data = r.randbytes(r.randrange(1, 9000))
            with lock:
                h.pwrite(data, i * region + off)
                acked[off : off + len(data)] = data
    except BaseException as err:  # reported by the test
        errors.append(err)


def test_concurrent_connections(tmp_path: Path) -> None:
    """Connections write at once into disjoint regions while snapshots are taken and
    read: on both data paths every snapshot equals the image as acknowledged when it
    was created (writers hold a lock per connection around each write and its record)."""
    rnd = random.Random(7)
    image = rnd.randbytes(SIZE)
    region = SIZE // CONNECTIONS
    for datapath in ("python", "compiled"):
        side = Side(tmp_path / datapath, datapath, image)
        try:
            acked = [bytearray(image[i * region : (i + 1) * region]) for i in range(CONNECTIONS)]
            locks = [threading.Lock() for _ in range(CONNECTIONS)]
            stop = threading.Event()
            errors: list[BaseException] = []
            threads = [
                threading.Thread(
                    target=write_until,
                    args=(side, i, region, acked[i], locks[i], stop, errors),
                )
                for i in range(CONNECTIONS)
            ]
            for t in threads:
                t.start()
            expected: dict[str, bytes] = {}
            for k in range(4):
                for lock in locks:
                    lock.acquire()
                try:
                    side.control.create_snapshot(
                        "disk", f"c{k}", max_size=None, writable=False, on_full="invalidate"
                    )
                    expected[f"disk@c{k}"] = b"".join(bytes(a) for a in acked)
                finally:
                    for lock in locks:
                        lock.release()
                # read while the writers go on
                got = side.handle(f"disk@c{k}", 0).pread(region * CONNECTIONS, 0)
                assert got == expected[f"disk@c{k}"]
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors[:3]
            for name, want in expected.items():
                assert side.handle(name, 1).pread(region * CONNECTIONS, 0) == want, name
        finally:
            side.close()
