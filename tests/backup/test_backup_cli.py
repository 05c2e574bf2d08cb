"""``snapimg backup`` / ``restore`` end to end against a real ``snapimg serve``, with qemu-io
changing the origin over NBD between backups; the backup points checked by QEMU's tools."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.backup.helpers import (
    PIECE,
    MiB,
    make_origin,
    manifest,
    pieces_digest_file,
    qemu_img,
    qemu_io,
    relies_on_holes,
    sha256_file,
    snapimg,
    snapimg_json,
)
from tests.interop.serving import Serve

SIZE = 66 * MiB  # not a multiple of the piece size: the last piece is 2 MiB


def _writer_round(uri: str, rng: random.Random, zero_ranges: bool) -> None:
    """Pattern writes at unaligned offsets, across block and piece boundaries; optionally
    write-zeroes and discards over ranges that hold data."""
    cmds = [f"write -P {rng.randrange(1, 255)} {4 * MiB - 4096} 8192"]  # across a piece
    for _ in range(12):
        off = rng.randrange(0, SIZE - MiB) // 512 * 512
        length = rng.choice([512, 4096, 65536 + 4096, 300 * 1024])
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
    if zero_ranges:
        cmds += [
            "write -z 0 192k",
            "write -z 1028k 4k",
            "discard 2M 128k",
            "write -z -u 8M 1M",
            f"write -z {SIZE - 64 * 1024} 64k",
        ]
    qemu_io(uri, *cmds)


def _origin(tmp_path: Path) -> Path:
    return make_origin(
        tmp_path / "disk.img",
        SIZE,
        "write -P 0x11 0 3M",
        "write -P 0x22 8M 2M",
        "write -P 0x33 40M 64k",
        f"write -P 0x44 {SIZE - MiB} 1M",
    )


def test_full_then_incrementals_are_a_qcow2_chain_that_restores_exactly(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
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
    backup("--since", "disk@s1", "--keep", "disk@s2", "--sha256")
    _writer_round(srv.uri("disk"), rng, zero_ranges=True)
    backup("--since", "s2")  # not kept: its snapshot is dropped

    man = manifest(bk)
    assert man["format"] == "snapimg-backup" and man["version"] == 2
    assert man["digest_rule"] == {"name": "sha256-pieces", "piece_size": 4194304}
    recs = man["backups"]
    assert [r["id"] for r in recs] == ["b0001", "b0002", "b0003", "b0004"]
    assert [r["parent"] for r in recs] == [None, "b0001", "b0002", "b0003"]
    assert [r["file"] for r in recs] == [f"b000{i}.qcow2" for i in range(1, 5)]
    for rec, res, exp in zip(recs, results, expected, strict=True):
        assert rec["digest"] == res["digest"] == pieces_digest_file(exp)
        assert rec["bytes_written"] == res["bytes_written"]
        assert (bk / rec["pieces"]).is_file()
    # the whole-image sha256 only where --sha256 asked for it
    assert [("sha256" in r) for r in recs] == [False, False, True, False]
    assert recs[2]["sha256"] == results[2]["sha256"] == sha256_file(expected[2])

    full, incs = results[0], results[1:]
    assert full["kind"] == "full" and full["bytes_read"] >= 6 * MiB
    assert full["bytes_skipped"] > 40 * MiB  # holes never read
    for inc in incs:
        assert inc["kind"] == "incremental"
        assert 0 < inc["changed_blocks"] < 80
        # only the pieces the changed blocks touch are read and hashed again
        assert 0 < inc["pieces_hashed"] <= 17
        assert inc["bytes_read"] <= inc["pieces_hashed"] * PIECE

    # every file of the directory: QEMU's tools see a chain; nothing relies on holes
    chain = json.loads(qemu_img("info", "--backing-chain", "--output=json", bk / "b0004.qcow2"))
    assert [Path(c["filename"]).name for c in chain] == [
        "b0004.qcow2",
        "b0003.qcow2",
        "b0002.qcow2",
        "b0001.qcow2",
    ]
    for child, parent in zip(chain, chain[1:], strict=False):
        assert child["format"] == "qcow2" and child["virtual-size"] == SIZE
        assert child["backing-filename"] == Path(parent["filename"]).name  # relative
        assert child["backing-filename-format"] == "qcow2"
    assert "backing-filename" not in chain[-1]
    for path in bk.iterdir():
        assert not relies_on_holes(path), path
    for rec, exp in zip(recs, expected, strict=True):
        qemu_img("check", "-f", "qcow2", bk / rec["file"])
        raw = tmp_path / f"convert-{rec['id']}.raw"
        qemu_img("convert", "-f", "qcow2", bk / rec["file"], "-O", "raw", raw)
        assert raw.read_bytes() == exp.read_bytes(), f"qemu-img convert of {rec['id']}"
        raw.unlink()
    # zero ranges of an incremental read as zero, not as the parent's data
    qemu_io(str(bk / "b0003.qcow2"), "read -P 0 0 192k", "read -P 0 8M 1M", fmt="qcow2")

    snaps = {s["name"] for s in snapimg_json("snapshot", "list", "--control", ctl)}
    assert snaps == {"disk@s1", "disk@s2"}

    for i, exp in enumerate(expected):
        out = tmp_path / f"restored{i}.img"
        res = snapimg_json("restore", bk, "--backup", recs[i]["id"], "--to", out)
        assert res["chain"] == [r["id"] for r in recs[: i + 1]]
        assert res["digest"] == recs[i]["digest"]
        assert out.read_bytes() == exp.read_bytes(), f"restore of {recs[i]['id']} differs"
        assert out.stat().st_blocks * 512 < 16 * MiB  # written sparse
        checksum = snapimg_json("checksum", "--pieces", bk, "--backup", recs[i]["id"])
        assert checksum["digest"] == recs[i]["digest"] and checksum["size"] == SIZE
    latest = tmp_path / "latest.img"
    snapimg("restore", bk, "--to", latest)  # default: the newest
    assert latest.read_bytes() == expected[-1].read_bytes()

    # one digest for any target: the backup dir, the qcow2 file, a raw image, an NBD URI
    want = recs[-1]["digest"]
    for target in (bk, bk / "b0004.qcow2", latest, srv.uri("disk")):
        assert snapimg("checksum", "--pieces", target).stdout.split()[0] == want, target

    # a copy by a tool that keeps no holes restores the same
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in bk.iterdir():
        subprocess.run(["cp", "--sparse=never", path, flat / path.name], check=True)
    again = tmp_path / "from-flat.img"
    snapimg("restore", flat, "--backup", "b0003", "--to", again)
    assert again.read_bytes() == expected[2].read_bytes()


def test_missing_parent_and_damage_are_refused_clearly(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    disk = _origin(tmp_path)
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "backups"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@a")
    qemu_io(srv.uri("disk"), "write -P 0x45 1M 64k")
    snapimg(
        "backup", "--control", srv.control, "disk", "--to", bk, "--since", "a", "--keep", "disk@b"
    )
    qemu_io(srv.uri("disk"), "write -P 0x55 2M 64k")
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "b")

    out = tmp_path / "out.img"
    (bk / "b0002.qcow2").rename(tmp_path / "moved.qcow2")
    proc = snapimg("restore", bk, "--backup", "b0003", "--to", out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "b0002.qcow2" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.img*"))
    snapimg("restore", bk, "--backup", "b0001", "--to", out)  # the full one still restores
    (tmp_path / "moved.qcow2").rename(bk / "b0002.qcow2")

    # a flipped byte in a data cluster: restore refuses, IMAGE stays as it was
    before = out.read_bytes()
    mapping = json.loads(qemu_img("map", "--output=json", bk / "b0002.qcow2"))
    host = next(m["offset"] for m in mapping if m["data"] and m["depth"] == 0)
    with (bk / "b0002.qcow2").open("r+b") as f:
        f.seek(host + 100)
        byte = f.read(1)
        f.seek(host + 100)
        f.write(bytes([byte[0] ^ 1]))
    proc = snapimg("restore", bk, "--backup", "b0003", "--to", out, "--force", check=False)
    assert proc.returncode == 1
    assert "does not match the manifest's" in proc.stderr and "piece at offset" in proc.stderr
    assert out.read_bytes() == before and not list(tmp_path.glob(".out.img*"))

    # an incremental from a snapshot no backup came from is refused; nothing is left over
    proc = snapimg(
        "backup", "--control", srv.control, "disk", "--to", bk, "--since", "nope", check=False
    )
    assert proc.returncode == 1 and "no backup in" in proc.stderr
    names = {s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)}
    assert names == {"disk@a", "disk@b"}
    assert sorted(p.name for p in bk.iterdir()) == sorted(
        ["manifest.json"] + [f"b000{i}.{ext}" for i in (1, 2, 3) for ext in ("qcow2", "pieces")]
    )


def test_incremental_rehashes_only_the_pieces_it_changed(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    disk = _origin(tmp_path)
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "backups"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@a")
    # one write inside piece 2 (data), one into piece 5 (a hole until now)
    qemu_io(
        srv.uri("disk"),
        f"write -P 0x61 {2 * PIECE + 4096} 4096",
        f"write -P 0x62 {5 * PIECE + 65536} 512",
    )
    inc = snapimg_json("backup", "--control", srv.control, "disk", "--to", bk, "--since", "a")
    assert inc["pieces_hashed"] == 2
    # block 2 is data; of piece 5's block only the written part is (the rest reads as
    # zero in the origin file and is written as zeroes)
    assert inc["changed_blocks"] == 2 and 65536 < inc["bytes_written"] <= 2 * 65536
    # piece 2 holds 2 MiB of 0x22 data: read whole; piece 5 held nothing but the new block
    assert inc["bytes_read"] <= PIECE + 65536
    assert inc["digest"] == pieces_digest_file(disk)
    out = tmp_path / "out.img"
    snapimg("restore", bk, "--to", out)
    assert out.read_bytes() == disk.read_bytes()
