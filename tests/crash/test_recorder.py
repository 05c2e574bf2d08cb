"""The system-call recorder and the crash-state model built on it."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

from reliability.crash import recording as rec
from reliability.crash.explorer import verify_against_disk
from reliability.crash.images import Image
from reliability.crash.states import power_states
from reliability.crash.timeline import Data, build, sweep

CALLS = textwrap.dedent("""
    import ctypes, ctypes.util, os, sys
    root, mark = sys.argv[1], sys.argv[2]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # as snapimg does
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    os.mkdir(f"{root}/dir")
    fd = os.open(f"{root}/dir/a.tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, b"A" * 5000, 100)
    os.write(fd, b"head")
    os.writev(fd, [b"v1", b"v2"])
    os.pwritev(fd, [b"x" * 600, b"y" * 600], 9000)
    os.pwritev(fd, [b"dsync"], 20000, os.RWF_DSYNC)
    assert libc.fallocate(fd, 0, 0, 65536) == 0
    assert libc.fallocate(fd, 3, 4096, 4096) == 0
    assert libc.fallocate(fd, 0x10, 30000, 1000) == 0
    os.posix_fallocate(fd, 65536, 4096)
    os.fdatasync(fd)
    os.ftruncate(fd, 50000)
    os.truncate(f"{root}/dir/a.tmp", 40000)
    os.rename(f"{root}/dir/a.tmp", f"{root}/dir/a")
    dfd = os.open(f"{root}/dir", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    g = os.open(f"{root}/dir/b", os.O_RDWR | os.O_CREAT | os.O_DSYNC, 0o600)
    os.copy_file_range(fd, g, 3000, 0, 10)
    os.close(g)
    with open(f"{root}/c", "wb") as f:
        f.write(b"python file object")
    os.unlink(f"{root}/c")
    os.fsync(fd)
    os.write(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_APPEND), b"done")
""")

CLONES = textwrap.dedent("""
    import fcntl, os, struct, sys
    root, mark = sys.argv[1], sys.argv[2]
    src = os.open(f"{root}/src", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(src, os.urandom(65536), 0)
    whole = os.open(f"{root}/whole", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.ioctl(whole, 0x40049409, src)                        # FICLONE
    part = os.open(f"{root}/part", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(part, b"p" * 40000, 0)
    fcntl.ioctl(part, 0x4020940D, struct.pack("qQQQ", src, 4096, 8192, 16384))  # FICLONERANGE
    os.pwrite(src, b"changed after the clones", 5000)
    os.write(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_APPEND), b"done")
""")


def run_recorded(
    lib: Path, where: Path, program: str, drop_sync: str | None = None
) -> list[rec.Op]:
    root = where / "root"
    root.mkdir()
    log, mark = where / "calls.log", where / "marks"
    env = rec.recorder_env(lib, root, log, mark, drop_sync)
    subprocess.run([sys.executable, "-c", program, str(root), str(mark)], env=env, check=True)
    ops = rec.parse_log(log.read_bytes())
    tl = build(ops, {}, {root.stat().st_ino: {}})
    verify_against_disk(tl, root.stat().st_ino, root)  # the recording explains every byte
    return ops


def test_records_every_kind_of_call(tmp_path: Path, recorder: Path) -> None:
    ops = run_recorded(recorder, tmp_path, CALLS)
    writes = [(op.offset, op.data, op.dsync) for op in ops if isinstance(op, rec.Write)]
    assert writes[:5] == [
        (100, b"A" * 5000, False), (0, b"head", False), (4, b"v1v2", False),
        (9000, b"x" * 600 + b"y" * 600, False), (20000, b"dsync", True),
    ]  # fmt: skip
    copied = writes[5]
    assert copied[0] == 10 and copied[2]  # into b, opened O_DSYNC
    assert copied[1] == (b"head" + b"v1v2" + bytes(92) + b"A" * 5000)[:3000]
    assert writes[6] == (0, b"python file object", False)
    assert [(op.mode, op.offset, op.length) for op in ops if isinstance(op, rec.Fallocate)] == [
        (0, 0, 65536), (3, 4096, 4096), (0x10, 30000, 1000), (0, 65536, 4096)]  # fmt: skip
    assert [op.size for op in ops if isinstance(op, rec.Truncate)] == [50000, 40000]
    names = [(type(op).__name__, getattr(op, "name", "") or getattr(op, "new_name", ""))
             for op in ops if isinstance(op, rec.Create | rec.Rename | rec.Unlink)]  # fmt: skip
    assert names == [("Create", "dir"), ("Create", "a.tmp"), ("Rename", "a"), ("Create", "b"),
                     ("Create", "c"), ("Unlink", "c")]  # fmt: skip
    assert sum(isinstance(op, rec.Sync) for op in ops) == 3  # fdatasync, directory, fsync
    assert [op.text for op in ops if isinstance(op, rec.Mark)] == ["done"]


def test_records_clones_with_their_source_bytes(recorder: Path, xfs_dir: Path) -> None:
    ops = run_recorded(recorder, xfs_dir, CLONES)
    src = [op for op in ops if isinstance(op, rec.Write)][0].data
    clones = [op for op in ops if isinstance(op, rec.Write) and len(op.data) != 40000][1:3]
    assert [(c.offset, c.data) for c in clones] == [(0, src), (16384, src[4096 : 4096 + 8192])]


def test_mutant_drops_only_the_named_files_syncs(tmp_path: Path, recorder: Path) -> None:
    program = textwrap.dedent("""
        import os, sys
        for name in ("store.data", "store.meta"):
            fd = os.open(f"{sys.argv[1]}/{name}", os.O_RDWR | os.O_CREAT, 0o600)
            os.write(fd, name.encode())
            os.fdatasync(fd)
            os.fsync(fd)
    """)
    ops = run_recorded(recorder, tmp_path, program, drop_sync="store.data")
    created = {op.ino: op.name for op in ops if isinstance(op, rec.Create)}
    assert [created[op.ino] for op in ops if isinstance(op, rec.Sync)] == ["store.meta"] * 2


def test_power_states_keep_page_cache_order() -> None:
    """Two unsynced writes into one sector: a crash shows none, the first, or both; never
    the second alone (the page cache wrote them back as one page)."""
    ino = 7
    ops: list[rec.Op] = [
        rec.Write(ino, 0, b"a" * 100, False),
        rec.Write(ino, 200, b"b" * 100, False),
    ]
    tl = build(ops, {ino: bytes(512)}, {1: {"f": ino}})
    assert all(isinstance(ev, Data) for ev in tl.events)
    first = b"a" * 100 + bytes(412)
    allowed = {bytes(512), first, first[:200] + b"b" * 100 + bytes(212)}
    seen = set()
    for cp in sweep(tl):
        for state in power_states(cp, random.Random(3), samples=20, omissions=2):
            content = state.images[ino].content()
            assert content in allowed
            seen.add(content)
    assert seen == allowed


def test_images_match_a_flat_model() -> None:
    rng = random.Random(5)
    for _ in range(500):
        ref, img = bytearray(), Image()
        for _ in range(8):
            op = rng.randrange(3)
            if op == 0:
                off, data = rng.randrange(40000), rng.randbytes(rng.randrange(1, 9000))
                ref += bytes(max(0, off - len(ref)))
                ref[off : off + len(data)] = data
                img.write(off, data)
            elif op == 1:
                off, n = rng.randrange(40000), rng.randrange(1, 30000)
                end = min(off + n, len(ref))
                ref[off:end] = bytes(max(0, end - off))
                img.zero(off, n)
            else:
                n = rng.randrange(45000)
                ref = ref[:n] + bytes(max(0, n - len(ref)))
                img.truncate(n)
            assert img.size == len(ref) and img.content() == bytes(ref)
