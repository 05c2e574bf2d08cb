"""Reflink copies on a real loop-mounted XFS (``mkfs.xfs -m reflink=1``), and the
fallbacks (copy_file_range, read + write) on ext4 and tmpfs.

The compiled data path clones origin blocks into the store (FICLONERANGE); the Python
reference copies them by read + write.  Both must give every snapshot exactly the
origin's content at its creation; on the compiled path the copy counters and FIEMAP
(the extents' shared flag) show that clones were made, and where they were not.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from enginetest_util import BS, acknowledged, make_image

from snapimg.engine import Engine
from snapimg.engine.compiled import REFLINK_ENV, CompiledDataPath
from snapimg.engine.reflink import clones, file_extents
from snapimg.engine.slots import SlotAllocator
from snapimg.errors import UsageError

SIZE = 10 * BS + 1000  # a partial last block
CHILD = Path(__file__).with_name("kill_child.py")
ONLY_COMPILED = "clones are the compiled data path's (the Python reference reads + writes)"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextmanager
def mounted(mnt: Path, *args: str) -> Iterator[Path]:
    """``mount ARGS MNT`` while in the block (the test is skipped with mount's reason
    where it cannot mount); unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    mnt.mkdir()
    mount = run("mount", *args, str(mnt))
    if mount.returncode:
        pytest.skip(f"cannot mount {' '.join(args)} here: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        if run("umount", str(mnt)).returncode:
            run("umount", "-l", str(mnt))


@pytest.fixture(scope="module")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 512 MiB XFS with reflink, loop-mounted for this module."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (Debian package xfsprogs)")
    root = tmp_path_factory.mktemp("xfs")
    image = root / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    mkfs = run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if mkfs.returncode:
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {mkfs.stderr.strip()}")
    with mounted(root / "mnt", "-o", "loop", str(image)) as mnt:
        yield mnt


@pytest.fixture
def xfs(xfs_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the loop XFS, removed after the test."""
    d = xfs_mount / request.node.name.replace("/", "_")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted(tmp_path / "tmpfs", "-t", "tmpfs", "-o", "size=64M", "tmpfs") as mnt:
        yield mnt


def clean_image(path: Path, size: int = SIZE) -> bytes:
    """A random image whose pages are on disk, not dirty (dirty runs are not cloned)."""
    data = make_image(path, size)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return data


def copies(eng: Engine) -> dict[str, int]:
    assert isinstance(eng.dp, CompiledDataPath)
    return eng.dp.copy_stats()


def shared_bytes(path: Path, start: int = 0, length: int | None = None) -> int:
    """Bytes of [start, start+length) in extents shared with another file (FIEMAP)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        exts = file_extents(fd, start, length)
    finally:
        os.close(fd)
    end = os.path.getsize(path) if length is None else start + length
    return sum(min(end, e.logical + e.length) - max(start, e.logical) for e in exts if e.shared)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def slot_of(eng: Engine, snap: str, block: int) -> int:
    """The store slot holding ``snap``'s copy of ``block``."""
    o = eng.origins["disk"]
    s = next(s for s in o.index.snaps.values() if s.name == snap)
    [(slot, _, _)] = o.index.sources(s, block, 1)
    assert slot >= 0, f"{snap} has no copy of block {block}"
    return slot


def check(eng: Engine, want: dict[str, bytes], content: bytes | bytearray) -> None:
    """Every snapshot reads what the origin held at its creation; the origin its own."""
    assert eng.origin_device("disk").pread(0, len(content)) == content
    for name, data in want.items():
        got = eng.snapshot_device("disk", name).pread(0, len(data))
        assert got == data, f"snapshot {name} differs"


def exercise(eng: Engine, content: bytearray) -> dict[str, bytes]:
    """Overwrite cloned blocks under several snapshots: whole blocks, parts of blocks, an
    unaligned run, the partial last block, blocks cloned before and overwritten since.
    Every write is flushed: the next copy then finds the origin's pages clean and clones
    (a write dirties a whole page cache folio, which may span neighbouring blocks)."""
    dev = eng.origin_device("disk")
    want: dict[str, bytes] = {}
    size = len(content)

    def write(off: int, data: bytes) -> None:
        dev.pwrite(off, data)
        content[off : off + len(data)] = data
        eng.flush()

    def snap(name: str) -> None:
        eng.create_snapshot("disk", name)
        want[name] = bytes(content)

    snap("s1")
    write(0, b"a" * BS)
    write(3 * BS + 8192, b"b" * 4096)
    write(5 * BS - 100, b"c" * (2 * BS + 200))
    write(size - 500, b"d" * 500)
    snap("s2")
    write(100, b"e" * 100)
    write(4 * BS, b"f" * (3 * BS))
    write(size - 1000, b"g" * 1000)
    snap("s3")
    write(BS + 7, b"h" * (8 * BS))
    check(eng, want, content)
    return want


def test_snapshots_keep_their_content_over_clones(xfs: Path, datapath: str) -> None:
    path = xfs / "disk.img"
    content = bytearray(clean_image(path))
    store = xfs / "store"
    with Engine.open(store, {"disk": path}, BS) as eng:
        want = exercise(eng, content)
        if datapath == "compiled":
            assert eng.dp.reflink("disk")  # type: ignore[attr-defined]
            stats = copies(eng)
            assert stats["clone_runs"] >= 6 and stats["dirty_runs"] == 0, stats
            assert shared_bytes(store / "store.data") > 0
        else:
            assert shared_bytes(store / "store.data") == 0
        # dropping s1 punches holes into its slots; the origin keeps its blocks
        before = allocated_bytes(store / "store.data")
        eng.drop_snapshot("disk", "s1")
        del want["s1"]
        assert allocated_bytes(store / "store.data") < before
        check(eng, want, content)
    with Engine.open(store, {"disk": path}, BS) as eng:
        check(eng, want, content)
        eng.create_snapshot("disk", "s4")
        want["s4"] = bytes(content)
        eng.origin_device("disk").pwrite(2 * BS, b"i" * (3 * BS))
        content[2 * BS : 5 * BS] = b"i" * (3 * BS)
        if datapath == "compiled":
            assert copies(eng)["clone_runs"] >= 1
        check(eng, want, content)
    with Engine.open(store, {"disk": path}, BS) as eng:
        check(eng, want, content)


def test_fiemap_shows_clones_shared(xfs: Path, datapath: str) -> None:
    """A clone shares the origin's extents; once the origin's overwrite is on disk (XFS
    copies on write), only the overwritten part stops being shared."""
    path = xfs / "disk.img"
    content = bytearray(clean_image(path))
    data = xfs / "store" / "store.data"
    with Engine.open(xfs / "store", {"disk": path}, BS) as eng:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        dev.pwrite(3 * BS + 8192, b"p" * 4096)  # part of block 3
        dev.pwrite(6 * BS, b"w" * BS)  # all of block 6
        eng.flush()
        part, whole = slot_of(eng, "s", 3), slot_of(eng, "s", 6)
        if datapath == "compiled":
            assert shared_bytes(data, part * BS, BS) == BS - 4096
            assert shared_bytes(path, 3 * BS, BS) == BS - 4096
            assert shared_bytes(data, whole * BS, BS) == 0
            assert shared_bytes(path, 6 * BS, BS) == 0
            assert "shared" in run("filefrag", "-v", str(data)).stdout  # e2fsprogs agrees
        else:
            assert shared_bytes(data) == shared_bytes(path) == 0
        snap = eng.snapshot_device("disk", "s")
        assert snap.pread(3 * BS, BS) == content[3 * BS : 4 * BS]
        assert snap.pread(6 * BS, BS) == content[6 * BS : 7 * BS]


def test_runs_clone_into_consecutive_slots(xfs: Path, datapath: str) -> None:
    """Freed single slots are not used for a run of blocks (one clone per run, never one
    per block), but they are used for single blocks.  (Slots are allocated by Python
    for both data paths; the clone counter is the compiled path's.)"""
    path = xfs / "disk.img"
    content = clean_image(path, 32 * BS)
    with Engine.open(xfs / "store", {"disk": path}, BS) as eng:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        for b in range(12):
            dev.pwrite(b * BS, b"x" * 512)
        eng.flush()
        snap = eng.snapshot_device("disk", "s")
        freed = {slot_of(eng, "s", b) for b in range(0, 12, 2)}
        for b in range(0, 12, 2):
            snap.trim(b * BS, BS)  # releases: every other slot is freed
        before = copies(eng)["clone_runs"] if datapath == "compiled" else 0
        dev.pwrite(16 * BS, b"y" * (4 * BS))
        if datapath == "compiled":
            assert copies(eng)["clone_runs"] == before + 1
        first = slot_of(eng, "s", 16)
        assert [slot_of(eng, "s", b) for b in range(16, 20)] == list(range(first, first + 4))
        dev.pwrite(24 * BS, b"z" * BS)
        assert slot_of(eng, "s", 24) in freed
        for b in (16, 24):
            assert snap.pread(b * BS, 4 * BS) == content[b * BS : (b + 4) * BS]


def cachestat_works() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        rng, out = (ctypes.c_uint64 * 2)(0, 4096), (ctypes.c_uint64 * 5)()
        return libc.syscall(451, fd, rng, out, 0) == 0
    finally:
        os.close(fd)


def test_dirty_runs_are_copied_not_cloned(xfs: Path, datapath: str) -> None:
    """A clone would first write the origin's dirty pages back and wait for the disk;
    the copy reads them from the page cache instead."""
    if datapath == "python":
        pytest.skip(ONLY_COMPILED)
    if not cachestat_works():
        pytest.skip("the kernel has no cachestat (Linux 6.5): dirty runs are cloned")
    path = xfs / "disk.img"
    content = bytearray(clean_image(path))
    data = xfs / "store" / "store.data"
    with Engine.open(xfs / "store", {"disk": path}, BS) as eng:
        dev = eng.origin_device("disk")
        dev.pwrite(2 * BS, b"1" * (2 * BS))  # dirty pages in blocks 2 and 3
        content[2 * BS : 4 * BS] = b"1" * (2 * BS)
        eng.create_snapshot("disk", "s")
        want = {"s": bytes(content)}
        dev.pwrite(2 * BS, b"2" * (2 * BS))
        stats = copies(eng)
        assert stats["dirty_runs"] == 1 and stats["clone_runs"] == 0, stats
        eng.flush()  # written back: clean pages clone again
        dev.pwrite(7 * BS, b"3" * BS)
        assert copies(eng)["clone_runs"] == 1
        assert shared_bytes(data, slot_of(eng, "s", 2) * BS, 2 * BS) == 0
        content[2 * BS : 4 * BS] = b"2" * (2 * BS)
        content[7 * BS : 8 * BS] = b"3" * BS
        check(eng, want, content)


@pytest.mark.parametrize("where", ["ext4", "tmpfs", "tmpfs-store", "xfs-reflink-off"])
def test_copies_without_reflink(
    where: str, tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch, datapath: str,
) -> None:  # fmt: skip
    """Where cloning cannot or may not be used the same workload gives the same
    snapshots: copy_file_range on one ext4 or tmpfs, read + write across file systems,
    and with SNAPIMG_REFLINK=off no clone at all (copy_file_range would clone on XFS)."""
    fs: Path = tmp_path
    if where.startswith("tmpfs"):
        fs = request.getfixturevalue("tmpfs")
    elif where.startswith("xfs"):
        fs = request.getfixturevalue("xfs")
        monkeypatch.setenv(REFLINK_ENV, "off")
    path = (tmp_path if where == "tmpfs-store" else fs) / "disk.img"
    content = bytearray(clean_image(path))
    store = fs / "store"
    store.mkdir()
    assert clones(store) == where.startswith("xfs")
    with Engine.open(store, {"disk": path}, BS) as eng:
        exercise(eng, content)
        if datapath == "compiled":
            stats = copies(eng)
            assert not eng.dp.reflink("disk")  # type: ignore[attr-defined]
            assert stats["clone_runs"] == 0, stats
            how = "rw_runs" if where in ("tmpfs-store", "xfs-reflink-off") else "copy_range_runs"
            assert stats[how] >= 6, stats
        if where.startswith("xfs"):
            assert shared_bytes(store / "store.data") == 0


def test_clones_survive_sigkill(xfs: Path, datapath: str) -> None:
    """A writer on the XFS is killed at random moments; after each kill the store reopens
    with every snapshot as it was made.  The writer clones every whole-block run, dirty
    origin pages or not (SNAPIMG_REFLINK=always; else most of its copies would find the
    blocks it just wrote dirty and be read + write copies)."""
    rnd = random.Random(15)
    path, store = xfs / "disk.img", xfs / "store"
    content = bytearray(clean_image(path, 16 * BS + 300))
    snaps: dict[str, bytes] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), SNAPIMG_REFLINK="always")
    mid_op, shared = 0, []
    for rnd_no in itertools.count():
        # 8 rounds, and more (up to 24) while fewer than 4 kills hit an operation
        if rnd_no >= 8 and (mid_op >= 4 or rnd_no >= 24):
            break
        durability = "strict" if rnd_no % 2 else "default"
        args = [str(store), str(path), str(BS), durability, str(rnd.randrange(1 << 30))]
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args, str(rnd_no)],
            stdout=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        first = [proc.stdout.readline(), proc.stdout.readline()]  # opened
        time.sleep(rnd.uniform(0.1, 0.5))
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the child died before it was killed"
        pending = acknowledged((b"".join(first) + out).decode().splitlines(), content, snaps)
        mid_op += bool(pending)
        with Engine.open(store, {"d": path}, BS) as eng:
            actual = eng.origin_device("d").pread(0, len(content))
            infos = {i.snap: i for i in eng.snapshots()}
            if pending[:1] == ["write"]:  # may have landed in part
                off, length, _ = map(int, pending[1:])
                content[off : off + length] = actual[off : off + length]
            assert actual == content, f"round {rnd_no}: the origin lost an acknowledged write"
            if pending[:1] == ["create"] and pending[1] in infos:
                snaps[pending[1]] = bytes(content)
            if pending[:1] == ["drop"] and pending[1] not in infos:
                del snaps[pending[1]]
            assert set(infos) == set(snaps), f"round {rnd_no}"
            for name, want in snaps.items():
                assert infos[name].valid, f"round {rnd_no}: {name}: {infos[name].reason}"
                got = eng.snapshot_device("d", name).pread(0, len(content))
                assert got == want, f"round {rnd_no}: snapshot {name} differs"
        shared.append(shared_bytes(store / "store.data"))
    assert mid_op >= 4, "the kills must hit operations, not only the start"
    if datapath == "compiled":
        assert max(shared) > 0, "no clone was left in the store"
    else:
        assert max(shared) == 0


def test_slot_allocator_gives_consecutive_slots(datapath: str) -> None:
    """Random allocations and frees: every request is one run, no slot is handed out
    twice, freed runs are reused best fit, free runs at the end shrink the area."""
    rnd = random.Random(5)
    alloc = SlotAllocator()
    held: list[tuple[int, int]] = []
    used: set[int] = set()
    for _ in range(2000):
        if held and rnd.random() < 0.45:
            start, count = held.pop(rnd.randrange(len(held)))
            pos = start
            while pos < start + count:  # freed in pieces, merged again
                n = rnd.randint(1, start + count - pos)
                alloc.free(pos, n)
                pos += n
            used -= set(range(start, start + count))
        else:
            n = rnd.randint(1, 16)
            fits = [(c, s) for s, c in alloc.runs() if c >= n]
            end = alloc.end
            [(start, count)] = alloc.alloc(n)
            assert count == n and not used & set(range(start, start + n))
            assert start == (min(fits)[1] if fits else end)  # best fit, else the end
            used |= set(range(start, start + n))
            held.append((start, n))
        free = {s + i for s, c in alloc.runs() for i in range(c)}
        assert not free & used and free | used == set(range(alloc.end))
        assert not alloc.runs() or sum(alloc.runs()[-1]) < alloc.end


def test_bad_reflink_setting_is_refused_before_anything_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datapath: str
) -> None:
    """SNAPIMG_REFLINK is checked where the compiled data path is chosen, before the
    store is touched; the Python data path, which never clones, does not read it."""
    path = tmp_path / "disk.img"
    make_image(path, SIZE)
    monkeypatch.setenv(REFLINK_ENV, "sometimes")
    if datapath == "python":
        Engine.open(tmp_path / "store", {"disk": path}, BS).close()
        return
    with pytest.raises(UsageError, match="bad SNAPIMG_REFLINK 'sometimes': expected on, off"):
        Engine.open(tmp_path / "store", {"disk": path}, BS)
    assert not (tmp_path / "store").exists()
