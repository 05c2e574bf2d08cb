"""The persistent store: overflow policies, store I/O errors (injected and a real full
tmpfs), wrong and damaged stores, boot-id invalidation, space given back on drop."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from enginetest_util import BS, make_image, store_bytes

from snapimg.engine import Engine, records
from snapimg.errors import (
    DeviceError,
    NoSpaceError,
    SnapshotInvalidError,
    StoreError,
    StoreFormatError,
    StoreMismatchError,
    UsageError,
)


class Faults:
    """Fails chosen store operations ("data", "log", "sync") with an errno."""

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}
        self.once = False

    def __call__(self, what: str) -> None:
        code = self.fail.get(what)
        if code is not None:
            if self.once:
                del self.fail[what]
            raise OSError(code, os.strerror(code))


# -- overflow policies ---------------------------------------------------------------------


def test_overflow_invalidate(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path, orig = image
    store = tmp_path / "store"
    with Engine.open(store, {"disk": path}) as eng:
        eng.create_snapshot("disk", "small", max_size=2 * BS)
        eng.create_snapshot("disk", "big")
        dev = eng.origin_device("disk")
        dev.pwrite(0, b"a" * (2 * BS))
        dev.pwrite(4 * BS, b"b" * 10)  # the third block: over the limit of "small"
        assert path.read_bytes()[4 * BS : 4 * BS + 10] == b"b" * 10  # origin write succeeded
        infos = {i.snap: i for i in eng.snapshots()}
        assert not infos["small"].valid and infos["small"].reason
        # the reason names the snapshot's own limit, not the store
        assert "reached its max size (--max-size 128.0 KiB)" in infos["small"].reason
        assert infos["big"].valid and infos["big"].preserved_blocks == 3
        with pytest.raises(SnapshotInvalidError, match="max size"):
            eng.snapshot_device("disk", "small").pread(0, 10)
        assert eng.snapshot_device("disk", "big").pread(0, len(orig)) == orig
    with Engine.open(store, {"disk": path}) as eng:  # invalid persistently, with reason
        infos = {i.snap: i for i in eng.snapshots()}
        assert not infos["small"].valid and "max size" in (infos["small"].reason or "")
        assert eng.snapshot_device("disk", "big").pread(0, len(orig)) == orig


def test_overflow_block_writes(image: tuple[Path, bytes], store_dir: Path | None) -> None:
    path, orig = image
    with Engine.open(store_dir, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s", max_size=2 * BS, on_full="block-writes")
        dev = eng.origin_device("disk")
        dev.pwrite(0, b"a" * (2 * BS))
        with pytest.raises(NoSpaceError) as err:
            dev.pwrite(4 * BS, b"b" * 10)
        assert err.value.errno == errno.ENOSPC
        assert path.read_bytes()[4 * BS : 5 * BS] == orig[4 * BS : 5 * BS]  # not written
        dev.pwrite(BS, b"c" * BS)  # already preserved blocks stay writable
        [info] = eng.snapshots()
        assert info.valid and info.preserved_blocks == 2
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig
        eng.drop_snapshot("disk", "s")
        dev.pwrite(4 * BS, b"b" * 10)


# -- store I/O errors ----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["data", "log"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_store_error_invalidates(
    tmp_path: Path, image: tuple[Path, bytes], what: str, code: int
) -> None:
    path, orig = image
    faults = Faults()
    store = tmp_path / "store"
    with Engine.open(store, {"disk": path}, fault=faults) as eng:
        eng.create_snapshot("disk", "s")
        faults.fail[what] = code
        faults.once = True  # the invalidation record itself can be written
        eng.origin_device("disk").pwrite(0, b"x" * 100)
        assert path.read_bytes()[:100] == b"x" * 100
        [info] = eng.snapshots()
        assert not info.valid and os.strerror(code) in (info.reason or "")
        assert eng.store.slots.end == 0  # the failed copy's slot was given back
    with Engine.open(store, {"disk": path}) as eng:
        assert not eng.snapshots()[0].valid


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_store_error_block_writes(tmp_path: Path, image: tuple[Path, bytes], code: int) -> None:
    path, orig = image
    faults = Faults()
    with Engine.open(tmp_path / "store", {"disk": path}, fault=faults) as eng:
        eng.create_snapshot("disk", "s", on_full="block-writes")
        faults.fail["data"] = code
        with pytest.raises(DeviceError) as err:
            eng.origin_device("disk").pwrite(0, b"x" * 100)
        assert err.value.errno == code
        assert path.read_bytes() == orig
        faults.fail.clear()
        eng.origin_device("disk").pwrite(0, b"x" * 100)
        [info] = eng.snapshots()
        assert info.valid
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def test_unrecordable_invalidation_refuses_the_write(
    tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    """When even the invalidation cannot be logged, the snapshot stays valid and the
    origin write is refused: nothing is lost and no snapshot is silently wrong."""
    path, orig = image
    faults = Faults()
    store = tmp_path / "store"
    with Engine.open(store, {"disk": path}, fault=faults) as eng:
        eng.create_snapshot("disk", "s")
        faults.fail["log"] = errno.EIO
        with pytest.raises(DeviceError) as err:
            eng.origin_device("disk").pwrite(0, b"x" * 100)
        assert err.value.errno == errno.EIO
        assert path.read_bytes() == orig
        assert eng.snapshots()[0].valid
        faults.fail.clear()
    with Engine.open(store, {"disk": path}) as eng:
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def test_real_enospc_on_full_tmpfs(tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    orig = make_image(path, 64 * BS)  # 4 MiB origin, 2 MiB store file system
    store = tmpfs("2M") / "store"
    with Engine.open(store, {"disk": path}) as eng:
        eng.create_snapshot("disk", "inv")
        dev = eng.origin_device("disk")
        for b in range(64):
            dev.pwrite(b * BS, bytes([b]) * BS)
        assert path.read_bytes() == b"".join(bytes([b]) * BS for b in range(64))
        [info] = eng.snapshots()
        assert not info.valid and "No space left" in (info.reason or "")
        eng.drop_snapshot("disk", "inv")
        # the space came back: a block-writes snapshot preserves until full, then refuses
        eng.create_snapshot("disk", "bw", on_full="block-writes")
        now = path.read_bytes()
        done = 0
        with pytest.raises(NoSpaceError):
            for b in range(64):
                dev.pwrite(b * BS, b"z" * BS)
                done += 1
        assert 8 < done < 64
        assert path.read_bytes()[done * BS :] == now[done * BS :]
        assert eng.snapshot_device("disk", "bw").pread(0, len(orig)) == now
    with Engine.open(store, {"disk": path}) as eng:
        assert eng.snapshot_device("disk", "bw").pread(0, len(orig)) == now


# -- wrong or damaged stores -------------------------------------------------------------


@pytest.fixture
def made_store(tmp_path: Path, image: tuple[Path, bytes]) -> tuple[Path, Path, bytes]:
    path, orig = image
    store = tmp_path / "store"
    with Engine.open(store, {"disk": path}) as eng:
        eng.create_snapshot("disk", "s")
        eng.origin_device("disk").pwrite(0, b"n" * (3 * BS))
    return store, path, orig


def _refused(
    store: Path, origins: dict[str, Path], exc: type[Exception], match: str, **kw: object
) -> None:
    before = store_bytes(store)
    with pytest.raises(exc, match=match):
        Engine.open(store, origins, **kw)  # type: ignore[arg-type]
    assert store_bytes(store) == before


def test_wrong_origin(made_store: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    store, path, orig = made_store
    other = tmp_path / "other.img"
    other.write_bytes(orig)  # same size and content, another file
    _refused(store, {"disk": other}, StoreMismatchError, "another file")
    shorter = tmp_path / "short.img"
    shorter.write_bytes(orig[:-1])
    _refused(store, {"disk": shorter}, StoreMismatchError, "size")
    _refused(store, {"disk": path}, StoreMismatchError, "block size", block_size=4096)
    # the same file under another name would bypass disk's snapshots
    _refused(store, {"again": path}, StoreMismatchError, "already holds .* as origin 'disk'")
    link = tmp_path / "link.img"
    os.link(path, link)
    _refused(store, {"disk": path, "twin": link}, UsageError, "are the same image")
    with Engine.open(store, {"disk": path}) as eng:  # still fine with the right one
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def _rewrite(meta: Path, fn: object) -> None:
    buf = bytearray(meta.read_bytes())
    fn(buf)  # type: ignore[operator]
    meta.write_bytes(bytes(buf))


def test_damaged_stores(made_store: tuple[Path, Path, bytes]) -> None:
    store, path, orig = made_store
    meta = store / "store.meta"
    good = meta.read_bytes()
    origins = {"disk": path}

    meta.write_bytes(good[:100])
    _refused(store, origins, StoreFormatError, "truncated")
    meta.write_bytes(good[:4200])
    _refused(store, origins, StoreFormatError, "truncated|corrupted")

    def flip_header(buf: bytearray) -> None:
        buf[40] ^= 0xFF

    meta.write_bytes(good)
    _rewrite(meta, flip_header)
    _refused(store, origins, StoreFormatError, "corrupted header")

    def future_version(buf: bytearray) -> None:
        struct.pack_into("<I", buf, 8, 99)
        head = struct.calcsize("<8sII16sIBB40sQ")
        struct.pack_into("<I", buf, head, zlib.crc32(bytes(buf[:head])))

    meta.write_bytes(good)
    _rewrite(meta, future_version)
    _refused(store, origins, StoreFormatError, "version 99")

    def flip_checkpoint(buf: bytearray) -> None:
        buf[4096 + 12] ^= 0x55

    meta.write_bytes(good)
    _rewrite(meta, flip_checkpoint)
    _refused(store, origins, StoreFormatError, "corrupted")

    meta.write_bytes(b"not a store at all" * 300)
    _refused(store, origins, StoreFormatError, "not a snapimg store")

    meta.write_bytes(good)
    data = store / "store.data"
    full = data.read_bytes()
    data.write_bytes(full[:BS])
    _refused(store, origins, StoreFormatError, "truncated")
    data.write_bytes(full)
    with Engine.open(store, origins) as eng:
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def test_corrupted_log_record(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """A bad record followed by intact ones is corruption, not a torn tail."""
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path})
    eng.create_snapshot("disk", "s")
    meta = store / "store.meta"
    start = eng.store.log_end  # type: ignore[attr-defined]
    for b in range(5):
        eng.origin_device("disk").pwrite(b * BS, b"w")
    eng.store.close()  # abandoned like a killed process: the log is not checkpointed
    for o in eng.origins.values():
        o.file.close()

    def flip(buf: bytearray) -> None:
        buf[start + 10] ^= 0x01

    _rewrite(meta, flip)
    _refused(store, {"disk": path}, StoreFormatError, "corrupted")


def test_torn_log_tail_is_cut(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path})
    eng.create_snapshot("disk", "s")
    eng.origin_device("disk").pwrite(0, b"w")
    end = eng.store.log_end  # type: ignore[attr-defined]
    eng.store.close()
    for o in eng.origins.values():
        o.file.close()
    with open(store / "store.meta", "r+b") as f:
        f.seek(end)
        f.write(b"\x30\x00\x00\x00\x05partial")  # a record the kill cut short
    with Engine.open(store, {"disk": path}) as eng:
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def test_store_in_use(made_store: tuple[Path, Path, bytes]) -> None:
    store, path, _ = made_store
    with Engine.open(store, {"disk": path}), pytest.raises(StoreError, match="in use"):
        Engine.open(store, {"disk": path})


# -- boot id -------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["default", "strict"])
def test_host_restart(tmp_path: Path, image: tuple[Path, bytes], durability: str) -> None:
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path}, durability=durability, boot_id="boot-a")  # type: ignore[arg-type]
    eng.create_snapshot("disk", "s")
    eng.origin_device("disk").pwrite(0, b"w" * BS)
    eng.store.close()  # the host went down with the store open
    for o in eng.origins.values():
        o.file.close()
    with Engine.open(store, {"disk": path}, boot_id="boot-b") as eng:
        [info] = eng.snapshots()
        if durability == "strict":  # everything was synced before the origin moved
            assert info.valid
            assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig
        else:
            assert not info.valid and "host restarted" in (info.reason or "")
    with Engine.open(store, {"disk": path}, boot_id="boot-c") as eng:
        # after a clean close another boot id is fine
        assert eng.snapshots()[0].valid == (durability == "strict")


def test_same_boot_after_kill_stays_valid(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path}, boot_id="boot-a")
    eng.create_snapshot("disk", "s")
    eng.origin_device("disk").pwrite(0, b"w" * BS)
    eng.store.close()
    for o in eng.origins.values():
        o.file.close()
    with Engine.open(store, {"disk": path}, boot_id="boot-a") as eng:
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


# -- space -----------------------------------------------------------------------------------


def test_drop_frees_space(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_image(path, 64 * BS)
    store = tmp_path / "store"
    data = store / "store.data"
    with Engine.open(store, {"disk": path}) as eng:
        eng.create_snapshot("disk", "a")
        dev = eng.origin_device("disk")
        dev.pwrite(0, b"1" * (32 * BS))
        eng.create_snapshot("disk", "b")
        dev.pwrite(16 * BS, b"2" * (32 * BS))  # 16 blocks shared by a and b, 16 only b
        used = data.stat().st_blocks * 512
        assert used >= 48 * BS
        eng.drop_snapshot("disk", "a")  # a's 16 old blocks go; shared ones stay for b
        assert data.stat().st_blocks * 512 <= used - 16 * BS
        assert eng.store.slots.end - eng.store.slots.free_count == 32
        eng.drop_snapshot("disk", "b")
        assert data.stat().st_blocks * 512 < 4 * BS
        eng.create_snapshot("disk", "c")
        dev.pwrite(0, b"3" * (4 * BS))
        assert eng.store.slots.end == 4  # reused from the start


def test_log_hole_after_host_restart_is_cut(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """After a power loss, unsynced log pages may be missing in any order: with another
    boot id a bad record followed by intact ones ends the log (strict mode synced every
    record an origin write depended on); in the same boot it is corruption."""
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path}, durability="strict", boot_id="boot-a")
    eng.create_snapshot("disk", "s")
    for b in range(5):
        eng.origin_device("disk").pwrite(b * BS, b"w")
    end = eng.store.log_end  # type: ignore[attr-defined]
    eng.store.close()
    for o in eng.origins.values():
        o.file.close()

    def unsynced_tail(buf: bytearray) -> None:
        # a lost page (garbage) followed by a surviving later record
        later = records.encode(records.DropRec(1, 99))
        buf[end : end + 40 + len(later)] = b"\xff" * 40 + later

    _rewrite(store / "store.meta", unsynced_tail)
    _refused(store, {"disk": path}, StoreFormatError, "corrupted", boot_id="boot-a")
    with Engine.open(store, {"disk": path}, boot_id="boot-b") as eng:
        [info] = eng.snapshots()
        assert info.valid
        assert eng.snapshot_device("disk", "s").pread(0, len(orig)) == orig


def test_log_compaction_while_open(
    tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long log is compacted at a lifecycle change; a kill afterwards replays the
    compacted state plus the records after it."""
    from snapimg.engine import store as store_mod

    monkeypatch.setattr(store_mod, "COMPACT_AFTER", 300)
    path, orig = image
    store = tmp_path / "store"
    eng = Engine.open(store, {"disk": path})
    eng.create_snapshot("disk", "a")
    dev = eng.origin_device("disk")
    for b in range(8):
        dev.pwrite(b * BS, b"1")
    mid = dev.pread(0, len(orig))
    before = eng.store.checkpoint_end  # type: ignore[attr-defined]
    eng.create_snapshot("disk", "b")  # compacts: the log had grown past the limit
    assert eng.store.checkpoint_end > before  # type: ignore[attr-defined]
    assert eng.store.log_end == eng.store.checkpoint_end  # type: ignore[attr-defined]
    dev.pwrite(0, b"2" * (3 * BS))
    eng.store.close()  # killed
    for o in eng.origins.values():
        o.file.close()
    with Engine.open(store, {"disk": path}) as eng:
        assert eng.snapshot_device("disk", "a").pread(0, len(orig)) == orig
        assert eng.snapshot_device("disk", "b").pread(0, len(orig)) == mid
