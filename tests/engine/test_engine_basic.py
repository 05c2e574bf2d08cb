"""The engine API on real files: copy-before-write, sharing, lifecycle, devices."""

from __future__ import annotations

from pathlib import Path

import pytest
from enginetest_util import BS, make_image

from snapimg.blockdev import BlockDevice, Extent
from snapimg.engine import Engine
from snapimg.errors import (
    DeviceError,
    EngineClosedError,
    OutOfRangeError,
    ReadOnlyError,
    ReleasedRangeError,
    SnapshotError,
    SnapshotInvalidError,
    UsageError,
)


def test_snapshot_keeps_old_content(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        origin = eng.origin_device("disk")
        info = eng.create_snapshot("disk", "s1")
        assert (info.origin, info.snap, info.valid) == ("disk", "s1", True)
        assert info.preserved_blocks == 0
        origin.pwrite(100, b"x" * 70000)  # partial blocks 0 and 1
        snap = eng.snapshot_device("disk", "s1")
        assert snap.pread(0, len(orig)) == orig
        assert origin.pread(100, 70000) == b"x" * 70000
        assert path.read_bytes()[100:70100] == b"x" * 70000
        [info] = eng.snapshots()
        assert info.preserved_blocks == 2 and info.preserved_bytes == 2 * BS
        assert eng.changed_ranges("disk", "s1") == [(0, 2 * BS)]


def test_shared_copy_serves_many_snapshots(
    image: tuple[Path, bytes], store_dir: Path | None
) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        origin = eng.origin_device("disk")
        for i in range(8):
            eng.create_snapshot("disk", f"s{i}")
        origin.pwrite(0, b"a" * (3 * BS))
        # one copy of three blocks serves all eight snapshots
        assert eng.store.slots.end == 3
        assert all(i.preserved_blocks == 3 for i in eng.snapshots())
        eng.create_snapshot("disk", "late")
        mid = origin.pread(0, len(orig))
        origin.pwrite(BS, b"b" * BS)
        assert eng.store.slots.end == 4
        for i in range(8):
            assert eng.snapshot_device("disk", f"s{i}").pread(0, len(orig)) == orig
        assert eng.snapshot_device("disk", "late").pread(0, len(orig)) == mid
        eng.drop_snapshot("disk", "late")  # its one block is freed
        assert eng.store.slots.end == 3
        for i in range(8):
            eng.drop_snapshot("disk", f"s{i}")
        assert eng.store.slots.end == 0
        assert eng.snapshots() == []


def test_reopen_restores_snapshots(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path, orig = image
    store = tmp_path / "store"
    with Engine.open(store, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s1", max_size=5 * BS, on_full="block-writes")
        eng.origin_device("disk").pwrite(5 * BS, b"q" * (2 * BS + 7))
        mid = eng.origin_device("disk").pread(0, len(orig))
        eng.create_snapshot("disk", "s2", writable=True)
        eng.snapshot_device("disk", "s2").pwrite(3, b"private")
        eng.origin_device("disk").pwrite(0, b"r" * 10)
    with Engine.open(store, {"disk": path}) as eng:
        infos = {i.snap: i for i in eng.snapshots()}
        assert infos["s1"].max_size == 5 * BS and infos["s1"].on_full == "block-writes"
        assert infos["s1"].preserved_blocks == 4 and infos["s2"].writable
        assert eng.snapshot_device("disk", "s1").pread(0, len(orig)) == orig
        want = bytearray(mid)
        want[3:10] = b"private"
        assert eng.snapshot_device("disk", "s2").pread(0, len(orig)) == bytes(want)
        assert path.read_bytes()[:10] == b"r" * 10


def test_errors(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s1")
        with pytest.raises(SnapshotError):
            eng.create_snapshot("disk", "s1")
        with pytest.raises(SnapshotError):
            eng.snapshot_device("disk", "nope")
        with pytest.raises(SnapshotError):
            eng.create_snapshot("other", "s1")
        with pytest.raises(UsageError):
            eng.create_snapshot("disk", "a@b")
        snap = eng.snapshot_device("disk", "s1")
        with pytest.raises(ReadOnlyError):
            snap.pwrite(0, b"x")
        with pytest.raises(OutOfRangeError):
            snap.pread(len(orig) - 1, 2)
        with pytest.raises(OutOfRangeError):
            eng.origin_device("disk").pwrite(len(orig), b"x")
        with pytest.raises(SnapshotError):
            eng.drop_snapshot("disk", "nope")
    with pytest.raises(UsageError):
        Engine.open(store_dir, {"disk": path}, block_size=1000)


def test_devices_implement_protocol(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s1")
        origin = eng.origin_device("disk")
        snap = eng.snapshot_device("disk", "s1")
        assert isinstance(origin, BlockDevice) and isinstance(snap, BlockDevice)
        assert not origin.read_only and snap.read_only
        assert origin.size == snap.size == len(orig)
        origin.trim(2 * BS, 3 * BS)  # punches a hole, after preserving
        origin.write_zeroes(6 * BS, BS, may_trim=False)
        assert origin.pread(2 * BS, 3 * BS) == bytes(3 * BS)
        assert origin.block_status(2 * BS, 3 * BS) == [Extent(3 * BS, True, True)]
        assert snap.pread(0, len(orig)) == orig
        # the snapshot reports its preserved blocks as data, the rest as the origin's state
        assert snap.block_status(2 * BS, 3 * BS) == [Extent(3 * BS, False, False)]
        origin.flush()
        snap.flush()


def test_release_frees_and_reads_fail(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s1")
        origin = eng.origin_device("disk")
        origin.pwrite(0, b"w" * (4 * BS))
        snap = eng.snapshot_device("disk", "s1")
        snap.trim(100, 3 * BS)  # whole blocks 1 and 2 only
        with pytest.raises(ReleasedRangeError):
            snap.pread(BS, 1)
        assert snap.pread(0, BS) == orig[:BS]
        assert snap.pread(3 * BS, BS) == orig[3 * BS : 4 * BS]
        assert eng.snapshots()[0].preserved_blocks == 2
        origin.pwrite(BS, b"v" * BS)  # released: no copy needed
        assert eng.snapshots()[0].preserved_blocks == 2
        assert eng.store.slots.free_count + 2 == eng.store.slots.end


def test_writable_snapshot(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        eng.create_snapshot("disk", "w", writable=True)
        snap = eng.snapshot_device("disk", "w")
        assert not snap.read_only
        snap.pwrite(BS - 3, b"hello")
        snap.write_zeroes(5 * BS, 10)
        want = bytearray(orig)
        want[BS - 3 : BS + 2] = b"hello"
        want[5 * BS : 5 * BS + 10] = bytes(10)
        assert snap.pread(0, len(orig)) == bytes(want)
        assert path.read_bytes() == orig  # the origin never changes because of it
        eng.origin_device("disk").pwrite(0, b"o" * (2 * BS))
        assert snap.pread(0, len(orig)) == bytes(want)


def test_devices_after_drop_and_close(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    eng = Engine.open(store_dir, {"disk": path})
    eng.create_snapshot("disk", "s")
    snap = eng.snapshot_device("disk", "s")
    origin = eng.origin_device("disk")
    eng.drop_snapshot("disk", "s")
    with pytest.raises(SnapshotInvalidError, match="dropped"):
        snap.pread(0, 1)
    eng.create_snapshot("disk", "s")  # the name is free again; the old device stays dead
    with pytest.raises(SnapshotInvalidError):
        snap.pread(0, 1)
    live = eng.snapshot_device("disk", "s")
    assert live.pread(0, 4) == orig[:4]
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(DeviceError):
        origin.pwrite(0, b"x")
    with pytest.raises(DeviceError):
        origin.pread(0, 1)
    for call in (lambda: live.pread(0, 1), lambda: live.trim(0, BS), live.flush):
        with pytest.raises(DeviceError, match="the engine is closed"):
            call()
    with pytest.raises(EngineClosedError, match="^the engine is closed$"):
        eng.create_snapshot("disk", "t")
    with pytest.raises(EngineClosedError):
        eng.drop_snapshot("disk", "s")


def test_origins_share_one_store(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da, db = make_image(a, 4 * BS, seed=1), make_image(b, 3 * BS + 5, seed=2)
    store = tmp_path / "store"
    with Engine.open(store, {"a": a, "b": b}) as eng:
        eng.create_snapshot("a", "s")
        eng.create_snapshot("b", "s")
        eng.origin_device("a").pwrite(0, b"A" * (2 * BS))
        eng.origin_device("b").pwrite(BS, b"B" * BS)
        assert eng.store.slots.end == 3  # one data area for both
    with Engine.open(store, {"b": b}) as eng:  # a subset: a's snapshot is kept aside
        assert [i.name for i in eng.snapshots()] == ["b@s"]
        assert eng.snapshot_device("b", "s").pread(0, len(db)) == db
        eng.origin_device("b").pwrite(2 * BS, b"C")
    with Engine.open(store, {"a": a, "b": b}) as eng:
        assert eng.snapshot_device("a", "s").pread(0, len(da)) == da
        assert eng.snapshot_device("b", "s").pread(0, len(db)) == db
        assert {i.name: i.preserved_blocks for i in eng.snapshots()} == {"a@s": 2, "b@s": 2}
