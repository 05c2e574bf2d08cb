"""Version-1 backup directories (a sparse raw full backup, ``.inc`` incrementals, whole-image
sha256): restore, verify and the readers still take them; backup and prune convert them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from snapimg.backup import incfile
from tests.backup.helpers import (
    MiB,
    manifest,
    pieces_digest_file,
    qemu_io,
    relies_on_holes,
    snapimg,
    snapimg_json,
)
from tests.interop.serving import Serve

SIZE = 20 * MiB
DATA = [(2 * MiB + 4096, 65536), (12 * MiB, MiB)]  # the incremental's data ranges
ZERO = [(0, 128 * 1024)]  # and its zero range (over data of the full backup)


def _record(i: int, parent: str | None, file: str, image: Path) -> dict[str, object]:
    return {
        "id": f"b{i:04d}",
        "parent": parent,
        "kind": "full" if parent is None else "incremental",
        "origin": "disk",
        "snapshot": f"disk@v{i}",
        "created": "2026-01-01T00:00:00+00:00",
        "file": file,
        "size": SIZE,
        "block_size": 65536,
        "bytes_written": 0,
        "sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
        "snapshot_kept": True,
    }


@pytest.fixture
def v1_dir(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A version-1 directory made of the files its format describes, and its two images."""
    a = tmp_path / "a.img"
    with a.open("wb") as f:
        f.truncate(SIZE)
    qemu_io(str(a), "write -P 0x31 0 3M", "write -P 0x32 9M 1M")
    b = tmp_path / "b.img"
    shutil.copyfile(a, b)
    qemu_io(
        str(b),
        "write -z 0 128k",
        f"write -P 0x41 {DATA[0][0]} 64k",
        f"write -P 0x42 {DATA[1][0]} 1M",
    )
    bk = tmp_path / "v1"
    bk.mkdir()
    subprocess.run(["cp", "--sparse=always", a, bk / "b0001.raw"], check=True)
    inc = bk / "b0002.inc"
    fd = os.open(inc, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, SIZE)
        content = b.read_bytes()
        for off, n in DATA:
            os.pwrite(fd, content[off : off + n], off)
        incfile.write_table(fd, incfile.IncTable(SIZE, 65536, DATA, ZERO))
    finally:
        os.close(fd)
    man = {
        "format": "snapimg-backup",
        "version": 1,
        "backups": [_record(1, None, "b0001.raw", a), _record(2, "b0001", "b0002.inc", b)],
    }
    (bk / "manifest.json").write_text(json.dumps(man))
    return bk, a, b


def test_version1_directory_is_read_in_place(
    v1_dir: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    bk, a, b = v1_dir
    for rec_id, image in (("b0001", a), ("b0002", b)):
        out = tmp_path / f"{rec_id}.out"
        res = snapimg_json("restore", bk, "--backup", rec_id, "--to", out)
        assert out.read_bytes() == image.read_bytes()
        assert res["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert snapimg("checksum", "--pieces", bk, "--backup", rec_id).stdout.split()[
            0
        ] == pieces_digest_file(image)
    report = json.loads(snapimg("inspect", bk, "--json").stdout)
    assert report["virtual_size"] == SIZE and report["backup"] == "b0002"
    assert snapimg("verify", bk).returncode == 0
    with (bk / "b0002.inc").open("r+b") as f:  # a flipped data byte
        f.seek(DATA[1][0] + 5)
        f.write(b"\x00")
    proc = snapimg("verify", bk, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("snapimg verify: b0002: sha256 ")
    assert manifest(bk)["version"] == 1  # readers never convert


def test_backup_converts_a_version1_directory_first(
    v1_dir: tuple[Path, Path, Path], tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    bk, a, b = v1_dir
    disk = tmp_path / "disk.img"
    shutil.copyfile(b, disk)
    qemu_io(str(disk), "write -P 0x51 5M 64k")
    srv = serve([f"disk={disk}"])
    proc = snapimg("backup", "--control", srv.control, "disk", "--to", bk)
    assert "notice: converted" in proc.stderr
    man = manifest(bk)
    assert man["version"] == 2 and man["digest_rule"]["name"] == "sha256-pieces"
    recs = man["backups"]
    assert [r["file"] for r in recs] == ["b0001.qcow2", "b0002.qcow2", "b0003.qcow2"]
    assert [r["parent"] for r in recs] == [None, "b0001", None]
    assert sorted(p.name for p in bk.iterdir()) == sorted(
        ["manifest.json"] + [f"b000{i}.{e}" for i in (1, 2, 3) for e in ("qcow2", "pieces")]
    )
    for rec, image in zip(recs, (a, b, disk), strict=True):
        assert rec["digest"] == pieces_digest_file(image)
        out = tmp_path / f"{rec['id']}.out"
        snapimg("restore", bk, "--backup", rec["id"], "--to", out)
        assert out.read_bytes() == image.read_bytes()
        assert not relies_on_holes(bk / rec["file"])
    assert recs[1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()  # kept
    assert snapimg("verify", bk).returncode == 0


def test_prune_converts_then_merges(v1_dir: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bk, _, b = v1_dir
    assert snapimg_json("prune", bk, "--keep-last", "1")["remaining"] == ["b0002"]
    assert sorted(p.name for p in bk.iterdir()) == ["b0002.pieces", "b0002.qcow2", "manifest.json"]
    out = tmp_path / "out.img"
    snapimg("restore", bk, "--to", out)
    assert out.read_bytes() == b.read_bytes()


def test_a_damaged_version1_directory_is_not_converted(v1_dir: tuple[Path, Path, Path]) -> None:
    bk, _, _ = v1_dir
    before = {p.name: p.read_bytes() for p in bk.iterdir()}
    with (bk / "b0001.raw").open("r+b") as f:
        f.seek(9 * MiB)
        f.write(b"\x00")
    before["b0001.raw"] = (bk / "b0001.raw").read_bytes()
    proc = snapimg("prune", bk, "--keep-last", "1", check=False)
    assert proc.returncode == 1 and "cannot convert" in proc.stderr
    assert {p.name: p.read_bytes() for p in bk.iterdir()} == before
