"""Stalled and failing storage: ``cbw_timeout`` bounds how long an origin write waits
for its copies (injected stalls, and a store on a real XFS frozen with fsfreeze), and a
full origin file system reaches the writer as ENOSPC with every snapshot exact."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from enginetest_util import BS, make_image

from snapimg.engine import Engine
from snapimg.errors import StoreStalledError


class Stall:
    """A store fault hook: once armed, the chosen operations ("data", "log") block until
    :meth:`release`, then fail with ``then_errno`` if given."""

    def __init__(self, *what: str, then_errno: int | None = None) -> None:
        self.what = set(what)
        self.then_errno = then_errno
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.armed = False

    def __call__(self, what: str) -> None:
        if self.armed and what in self.what:
            self.entered.set()
            self.gate.wait(60)
            if self.then_errno is not None:
                raise OSError(self.then_errno, os.strerror(self.then_errno))

    def release(self) -> None:
        self.gate.set()


def wait_for(cond: object, what: str) -> None:
    for _ in range(200):
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting: {what}")


def test_stalled_copy_invalidates_and_the_write_goes_on(
    tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    path, orig = image
    stall = Stall("data")
    eng = Engine.open(tmp_path / "store", {"disk": path}, fault=stall, cbw_timeout=0.4)
    try:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        stall.armed = True
        dev.pwrite(0, b"new" * 100)  # returns although the copy is stuck in the store
        # the copy is stuck in the store (its thread may reach the hook only after the
        # 0.4 s the write waited, on a loaded machine)
        assert stall.entered.wait(30) and not stall.gate.is_set()
        assert path.read_bytes()[:300] == b"new" * 100
        [info] = eng.snapshots()
        assert not info.valid
        assert "did not complete within 0.4 s (--cbw-timeout)" in (info.reason or "")
        stall.release()  # the late copy completes and records nothing
        wait_for(lambda: eng.store.pending, "the late copy's slots to come back")
        dev.pwrite(BS, b"x")  # (gives the late copy's space back)
        assert eng.store.slots.end - eng.store.slots.free_count == 0
    finally:
        stall.release()
        eng.close()
    with Engine.open(tmp_path / "store", {"disk": path}) as eng:
        [info] = eng.snapshots()
        assert not info.valid and "cbw-timeout" in (info.reason or "")
        assert eng.store.slots.end == 0


@pytest.mark.parametrize("policy", ["invalidate", "block-writes"])
def test_stalled_store_refuses_the_write_and_the_snapshot_stays_exact(
    tmp_path: Path, image: tuple[Path, bytes], policy: str
) -> None:
    """The copy is stuck and the store cannot record an invalidation either (its log
    stalls, then fails): the write fails with EIO, the origin is not written, the
    snapshot stays valid and reads exactly what it held."""
    path, orig = image
    stall = Stall("data", "log", then_errno=errno.EIO)
    eng = Engine.open(tmp_path / "store", {"disk": path}, fault=stall, cbw_timeout=0.4)
    try:
        eng.create_snapshot("disk", "s", on_full=policy)
        dev = eng.origin_device("disk")
        stall.armed = True
        with pytest.raises(StoreStalledError) as exc:
            dev.pwrite(0, b"new" * 100)
        assert exc.value.errno == errno.EIO
        if policy == "block-writes":
            assert "policy block-writes" in str(exc.value)
        else:
            assert "snapshots stay valid" in str(exc.value)
        assert path.read_bytes() == orig
        stall.release()  # (lifecycle calls wait for a stalled log: release it first)
        wait_for(lambda: not eng.dp.runner.busy(), "the stalled store work to finish")
        assert eng.snapshots()[0].valid  # the late invalidation failed: still valid
        eng.store.fault = None
        dev.pwrite(0, b"new" * 100)  # the store is back: the write copies and goes on
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig
    finally:
        stall.release()
        eng.close()
    with Engine.open(tmp_path / "store", {"disk": path}) as eng:
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


# -- a real frozen file system --------------------------------------------------------------


def test_frozen_store_bounds_the_write(tmp_path: Path, loop_xfs: Path) -> None:
    """The store on an XFS frozen with fsfreeze, the origin elsewhere: a write that needs
    a copy returns (EIO) while the store is still frozen; one that needs none goes on;
    after the thaw the snapshot is exact, or invalid with the reason: never wrong."""
    path = tmp_path / "disk.img"
    orig = make_image(path, 16 * BS)
    xfs = loop_xfs
    store = xfs / "store"
    eng = Engine.open(store, {"disk": path}, cbw_timeout=1.0)
    try:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        dev.pwrite(0, b"a" * BS)  # block 0 preserved before the freeze
        subprocess.run(["fsfreeze", "-f", str(xfs)], check=True)
        outcome: list[object] = []

        def write() -> None:
            try:
                dev.pwrite(BS * 3, b"b" * BS)
                outcome.append("written")
            except StoreStalledError as err:
                outcome.append(err)

        t = threading.Thread(target=write)
        t.start()
        t.join(30)  # generous: the point is that it returns while the store is frozen
        assert outcome and isinstance(outcome[0], StoreStalledError), outcome
        assert path.read_bytes()[3 * BS : 4 * BS] == orig[3 * BS : 4 * BS]
        dev.pwrite(10, b"c" * 100)  # block 0 needs no copy: not held up by the store
        subprocess.run(["fsfreeze", "-u", str(xfs)], check=True)
        wait_for(lambda: not eng.dp.runner.busy(), "the stalled store work to finish")
        [info] = eng.snapshots()
        snap = eng.snapshot_device("disk", "s")
        if info.valid:
            assert snap.pread(0, len(orig)) == orig
        else:
            assert "cbw-timeout" in (info.reason or "")
        dev.pwrite(BS * 3, b"b" * BS)  # thawed: copies work again
        if eng.snapshots()[0].valid:
            assert snap.pread(0, len(orig)) == orig
    finally:
        subprocess.run(["fsfreeze", "-u", str(xfs)], capture_output=True)
        eng.close()


def test_full_origin_file_system_is_enospc(tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    """The origin's own file system fills up: the write fails with ENOSPC (an NBD client
    sees ENOSPC), and the snapshot keeps exactly what it held."""
    path = tmpfs("1M") / "sparse.img"
    with path.open("wb") as f:
        f.truncate(64 * BS)  # 4 MiB of holes on 1 MiB of space
    eng = Engine.open(tmp_path / "store", {"disk": path})
    try:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        with pytest.raises(OSError) as exc:
            for b in range(64):
                dev.pwrite(b * BS, bytes([b + 1]) * BS)
        assert exc.value.errno == errno.ENOSPC
        assert eng.snapshot_device("disk", "s").pread(0, 64 * BS) == bytes(64 * BS)
        assert eng.snapshots()[0].valid
    finally:
        eng.close()
