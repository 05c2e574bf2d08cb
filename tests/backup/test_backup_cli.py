"""``snapimg backup`` / ``restore`` end to end against a real ``snapimg serve``, with qemu-io
changing the origin over NBD between backups."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.backup.helpers import SNAPIMG, qemu_io, sha256_file, snapimg, snapimg_json
from tests.interop.serving import Serve

MiB = 1 << 20
SIZE = 64 * MiB


def _writer_round(uri: str, rng: random.Random, zero_ranges: bool) -> None:
    """Pattern writes at unaligned offsets, across block boundaries; optionally write-zeroes
    and discards of ranges that hold data."""
    cmds = []
    for _ in range(12):
        off = rng.randrange(0, SIZE - MiB) // 512 * 512
        length = rng.choice([512, 4096, 65536 + 4096, 300 * 1024])
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
    if zero_ranges:
        cmds += ["write -z 0 192k", "write -z 1028k 4k", "discard 2M 128k",
                 "write -z -u 8M 1M"]
    qemu_io(uri, *cmds)


def _origin(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(SIZE)
    qemu_io(str(disk), "write -P 0x11 0 3M", "write -P 0x22 8M 2M", "write -P 0x33 40M 64k")
    return disk


def test_full_then_three_incrementals_restore_exactly(
        tmp_path: Path, serve: Callable[..., Serve]) -> None:
    disk = _origin(tmp_path)
    srv = serve([f"disk={disk}"])
    ctl = srv.control
    bk = tmp_path / "backups"
    rng = random.Random(8)
    expected: list[Path] = []
    results = []

    def backup(*extra: str) -> None:
        results.append(snapimg_json("backup", "--control", ctl, "disk", "--to", bk, *extra))
        # the writer is idle: the origin file is the image at the snapshot's time
        copy = tmp_path / f"expect{len(expected)}.img"
        shutil.copyfile(disk, copy)
        expected.append(copy)

    backup("--keep", "disk@s0")
    _writer_round(srv.uri("disk"), rng, zero_ranges=False)
    backup("--since", "s0", "--keep", "disk@s1")
    snapimg("snapshot", "drop", "--control", ctl, "disk@s0")
    _writer_round(srv.uri("disk"), rng, zero_ranges=True)
    backup("--since", "disk@s1", "--keep", "disk@s2")
    _writer_round(srv.uri("disk"), rng, zero_ranges=True)
    backup("--since", "s2")  # not kept: its snapshot is dropped

    man = json.loads((bk / "manifest.json").read_text())
    recs = man["backups"]
    assert [r["id"] for r in recs] == ["b0001", "b0002", "b0003", "b0004"]
    assert [r["parent"] for r in recs] == [None, "b0001", "b0002", "b0003"]
    assert [r["snapshot"] for r in recs[:3]] == ["disk@s0", "disk@s1", "disk@s2"]
    for rec, res, exp in zip(recs, results, expected, strict=True):
        assert rec["sha256"] == res["sha256"] == sha256_file(exp)
        assert rec["bytes_written"] == res["bytes_written"]
        assert (bk / rec["file"]).is_file()
    full, incs = results[0], results[1:]
    assert full["bytes_read"] >= 5 * MiB and full["bytes_skipped"] > 40 * MiB
    for inc in incs:
        assert inc["kind"] == "incremental"
        assert 0 < inc["changed_blocks"] < 64  # 12 writes + 4 zero ranges touch few blocks
        assert inc["bytes_read"] < 8 * MiB
    assert incs[1]["bytes_skipped"] > 0  # write-zeroes/discard recorded as zero ranges

    snaps = {s["name"] for s in snapimg_json("snapshot", "list", "--control", ctl)}
    assert snaps == {"disk@s1", "disk@s2"}

    for i, exp in enumerate(expected):
        out = tmp_path / f"restored{i}.img"
        res = snapimg_json("restore", bk, "--backup", recs[i]["id"], "--to", out)
        assert res["chain"] == [r["id"] for r in recs[: i + 1]]
        assert out.read_bytes() == exp.read_bytes(), f"restore of {recs[i]['id']} differs"
    # default: the newest
    latest = tmp_path / "latest.img"
    snapimg("restore", bk, "--to", latest)
    assert latest.read_bytes() == expected[-1].read_bytes()


def test_missing_parent_is_refused_clearly(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    disk = _origin(tmp_path)
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "backups"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@a")
    qemu_io(srv.uri("disk"), "write -P 0x44 1M 64k")
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "a",
            "--keep", "disk@b")
    qemu_io(srv.uri("disk"), "write -P 0x55 2M 64k")
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "b")

    out = tmp_path / "out.img"
    (bk / "b0002.inc").rename(tmp_path / "moved.inc")
    proc = snapimg("restore", bk, "--backup", "b0003", "--to", out, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("snapimg restore: broken chain: file b0002.inc of "
                                   "backup b0002 is missing")
    assert not out.exists() and not list(tmp_path.glob(".out.img*"))
    # the full backup alone still restores
    snapimg("restore", bk, "--backup", "b0001", "--to", out)

    man = json.loads((bk / "manifest.json").read_text())
    man["backups"] = [r for r in man["backups"] if r["id"] != "b0002"]
    (bk / "manifest.json").write_text(json.dumps(man))
    proc = snapimg("restore", bk, "--backup", "b0003", "--to", tmp_path / "x.img", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "broken chain: backup b0003 needs parent b0002, which is not in the manifest" \
        in proc.stderr

    # a corrupted backup file is caught by the sha256 check; the target stays untouched
    out.unlink()
    with (bk / "b0001.raw").open("r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 1]))
    proc = snapimg("restore", bk, "--backup", "b0001", "--to", out, check=False)
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "does not match the manifest" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.img*"))

    # an incremental from a snapshot no backup came from is refused; nothing is left over
    proc = snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "nope",
                   check=False)
    assert proc.returncode == 1 and "no backup in" in proc.stderr
    names = {s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)}
    assert names == {"disk@a", "disk@b"}


def test_killed_backup_leaves_directory_valid(tmp_path: Path,
                                              serve: Callable[..., Serve]) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(160 * MiB)
    qemu_io(str(disk), "write -P 0x61 0 128M")
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "backups"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk)
    before = (bk / "manifest.json").read_bytes()

    proc = _backup_killed_midway(srv, bk, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (bk / "manifest.json").read_bytes() == before
    assert not (bk / "b0002.raw").exists()
    leftover = [s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)]
    assert len(leftover) == 1 and leftover[0].startswith("disk@backup-b0002-")
    out = tmp_path / "out.img"
    snapimg("restore", bk, "--to", out)

    # the next backup cleans up: temporary file and the killed run's snapshot
    res = snapimg_json("backup", "--control", srv.control, "disk", "--to", bk)
    assert res["id"] == "b0002"
    assert not list(bk.glob(".*.tmp"))
    assert snapimg_json("snapshot", "list", "--control", srv.control) == []
    assert res["sha256"] == sha256_file(disk)

    # SIGTERM: the backup itself removes its temporary file and drops its snapshot
    before = (bk / "manifest.json").read_bytes()
    proc = _backup_killed_midway(srv, bk, signal.SIGTERM)
    assert proc.returncode == 130
    assert (bk / "manifest.json").read_bytes() == before
    assert not list(bk.glob(".*.tmp")) and not (bk / ".pending.json").exists()
    assert snapimg_json("snapshot", "list", "--control", srv.control) == []


def _backup_killed_midway(srv: Serve, bk: Path, sig: signal.Signals) -> subprocess.Popen[bytes]:
    """Start a backup, send ``sig`` once its temporary file holds data, wait for it."""
    man = json.loads((bk / "manifest.json").read_text())
    next_id = f"b{len(man['backups']) + 1:04d}"
    proc = subprocess.Popen([*SNAPIMG, "backup", "--control", str(srv.control), "disk",
                             "--to", str(bk)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        tmp_file = bk / f".{next_id}.raw.tmp"
        deadline = time.monotonic() + 60
        while not (tmp_file.exists() and tmp_file.stat().st_blocks > 0):
            assert proc.poll() is None, "backup finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.killpg(proc.pid, sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc
