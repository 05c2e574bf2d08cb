"""``snapimg verify`` finds damage anywhere in a backup's data and metadata; ``snapimg prune``
merges old points away, and survives SIGKILL at any moment."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapimg.qemuexport import QemuExport
from tests.backup.helpers import (
    SNAPIMG,
    MiB,
    make_origin,
    manifest,
    qemu_img,
    qemu_io,
    relies_on_holes,
    snapimg,
    snapimg_json,
    stop,
)
from tests.interop.serving import Serve

SIZE = 48 * MiB


@pytest.fixture
def chain(tmp_path: Path, serve: Callable[..., Serve]) -> tuple[Path, dict[str, bytes]]:
    """A directory of five points (a full one, four incrementals) and each one's image."""
    disk = make_origin(tmp_path / "disk.img", SIZE, "write -P 0x10 0 12M", "write -P 0x11 30M 2M")
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "bk"
    rng = random.Random(5)
    images: dict[str, bytes] = {}
    prev = None
    for i in range(1, 6):
        if prev is not None:
            cmds = [
                f"write -P {0x20 + i} {rng.randrange(0, SIZE - MiB) // 4096 * 4096} "
                f"{rng.choice([4096, 65536, 3 * MiB])}"
                for _ in range(6)
            ]
            cmds.append(f"write -z {rng.randrange(0, 12) * MiB} 1M")
            qemu_io(srv.uri("disk"), *cmds)
        args = ["--keep", f"disk@s{i}"] + (["--since", prev] if prev else [])
        snapimg("backup", "--control", srv.control, "disk", "--to", bk, *args)
        if prev:
            snapimg("snapshot", "drop", "--control", srv.control, f"disk@{prev}")
        prev = f"s{i}"
        images[f"b{i:04d}"] = disk.read_bytes()
    return bk, images


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _own_data_offset(qcow2: Path) -> tuple[int, int]:
    """(guest offset, host offset) of a data cluster held by this file itself."""
    mapping = json.loads(qemu_img("map", "--output=json", qcow2))
    m = next(m for m in mapping if m["data"] and m["depth"] == 0 and "offset" in m)
    return m["start"], m["offset"]


def _verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return snapimg("verify", *args, check=False)


def test_verify_finds_a_flipped_byte_in_any_file(chain: tuple[Path, dict[str, bytes]]) -> None:
    bk, _ = chain
    report = json.loads(_verify(bk, "--json").stdout)
    assert report["ok"] and [p["id"] for p in report["points"]] == list(chain[1])
    for p in report["points"]:
        assert p["ok"] and p["digest"] == p["expected"] and p["qemu_img_check"]["status"] == 0
    assert _verify(bk).returncode == 0

    # a byte of b0004's own data: b0004 is bad, and b0005 wherever it shows that cluster
    guest, host = _own_data_offset(bk / "b0004.qcow2")
    _flip(bk / "b0004.qcow2", host + 7)
    proc = _verify(bk)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("snapimg verify: b0004: digest ")
    assert f"piece at offset {guest // (4 * MiB) * 4 * MiB}" in lines[0]
    assert all(line.split(":")[1].strip() in ("b0004", "b0005") for line in lines)
    assert proc.stdout.startswith("b0001: ok")
    proc = _verify(bk, "--backup", "b0003")
    assert proc.returncode == 0 and proc.stdout.startswith("b0003: ok")
    _flip(bk / "b0004.qcow2", host + 7)  # repaired
    assert _verify(bk).returncode == 0

    # qcow2 metadata: cluster 0 (the header) claimed free in the refcount block
    path = bk / "b0002.qcow2"
    with path.open("r+b") as f:
        f.seek(48)
        (table,) = struct.unpack(">Q", f.read(8))
        f.seek(table)
        (block,) = struct.unpack(">Q", f.read(8))
        f.seek(block)
        f.write(b"\0\0")
    proc = _verify(bk, "--backup", "b0002", "--json")
    assert proc.returncode == 1
    point = json.loads(proc.stdout)["points"][0]
    assert point["qemu_img_check"]["corruptions"] > 0
    assert "qemu-img check: " in proc.stderr

    # a damaged piece digest file; a missing manifest is an error (2), not a bad point
    shutil.copyfile(bk / "b0003.pieces", bk / "saved")
    _flip(bk / "b0003.pieces", 45)
    proc = _verify(bk, "--backup", "b0003")
    assert proc.returncode == 1 and "piece digest file" in proc.stderr
    # a chain rewired behind snapimg's back
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b0001.qcow2", "-F", "qcow2", bk / "b0003.qcow2")
    proc = _verify(bk, "--backup", "b0003")
    assert proc.returncode == 1
    assert "its backing file is b0001.qcow2, not the file of its parent b0002" in proc.stderr
    (bk / "manifest.json").rename(bk / "m")
    proc = _verify(bk)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_prune_merges_old_points_and_every_kept_one_verifies(
    chain: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    bk, images = chain
    res = snapimg_json("prune", bk, "--keep-last", "2")
    assert res["removed"] == ["b0001", "b0002", "b0003"]
    assert res["remaining"] == ["b0004", "b0005"]
    man = manifest(bk)
    assert [(r["id"], r["parent"], r["kind"]) for r in man["backups"]] == [
        ("b0004", None, "full"),
        ("b0005", "b0004", "incremental"),
    ]
    assert sorted(p.name for p in bk.iterdir()) == [
        "b0004.pieces",
        "b0004.qcow2",
        "b0005.pieces",
        "b0005.qcow2",
        "manifest.json",
    ]
    info = json.loads(qemu_img("info", "--output=json", bk / "b0004.qcow2"))
    assert "backing-filename" not in info
    for path in bk.iterdir():
        assert not relies_on_holes(path), path
    assert _verify(bk).returncode == 0
    for rec_id in ("b0004", "b0005"):
        out = tmp_path / f"{rec_id}.img"
        snapimg("restore", bk, "--backup", rec_id, "--to", out)
        assert out.read_bytes() == images[rec_id]
    assert snapimg_json("prune", bk, "--keep-last", "2")["removed"] == []
    proc = snapimg("prune", bk, "--keep-last", "0", check=False)
    assert proc.returncode == 1 and "keep at least one" in proc.stderr


def _until_phases(
    delays: list[float], states: set[tuple[str, ...]], rng: random.Random, span: float
) -> Iterator[float]:
    """``delays``, then more while the kills landed in fewer than three phases of the
    prune (on a loaded machine they may bunch up), 40 kills at most."""
    yield from delays
    for _ in range(40 - len(delays)):
        if len(states) >= 3:
            return
        yield rng.uniform(0.0, span * 1.5)


def test_sigkill_at_any_moment_of_a_prune_leaves_every_listed_point_restorable(
    chain: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    pristine, images = chain
    # how long an undisturbed prune takes, to spread the kills over it (not asserted)
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    t0 = time.monotonic()
    snapimg("prune", work, "--keep-last", "1")
    span = time.monotonic() - t0
    rng = random.Random(11)
    delays = sorted(rng.uniform(0.0, span) for _ in range(14))
    states: set[tuple[str, ...]] = set()
    for delay in _until_phases(delays, states, rng, span):
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        proc = subprocess.Popen(
            [*SNAPIMG, "prune", str(work), "--keep-last", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)  # snapimg and the qemu-img it runs
            proc.wait(60)
        finally:
            stop(proc)
        listed = [r["id"] for r in manifest(work)["backups"]]
        states.add(tuple(listed))
        for rec_id in listed:
            out = tmp_path / "out.img"
            snapimg("restore", work, "--backup", rec_id, "--to", out, "--force")
            assert out.read_bytes() == images[rec_id], f"{rec_id} after a kill at {delay:.3f}s"
        assert _verify(work).returncode == 0
        snapimg("prune", work, "--keep-last", "1")  # finishes what was left
        assert [r["id"] for r in manifest(work)["backups"]] == ["b0005"]
        assert sorted(p.name for p in work.iterdir()) == [
            "b0005.pieces",
            "b0005.qcow2",
            "manifest.json",
        ]
    assert len(states) >= 3  # the kills landed in different phases of the prune


def test_prune_does_not_write_under_a_reader_and_finishes_later(
    chain: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """QEMU's image locks: while a point's chain is open for reading (as restore and
    verify hold it), the commit that would write below it fails; nothing listed changes."""
    bk, images = chain
    with QemuExport(bk / "b0003.qcow2", "qcow2"):  # holds b0001..b0003 open
        proc = snapimg("prune", bk, "--keep-last", "3", check=False)
    assert proc.returncode == 1 and 'Failed to get "write" lock' in proc.stderr
    assert proc.stderr.count("\n") == 1
    for rec in manifest(bk)["backups"]:
        out = tmp_path / "out.img"
        snapimg("restore", bk, "--backup", rec["id"], "--to", out, "--force")
        assert out.read_bytes() == images[rec["id"]]
    res = snapimg_json("prune", bk, "--keep-last", "3")
    assert res["remaining"] == ["b0003", "b0004", "b0005"]
    assert _verify(bk).returncode == 0
