"""``snapimg inspect`` on images built by the real tools, checked against those tools' own
view of the same bytes: sfdisk -J, blkid -p, mdir, dumpe2fs, ntfsinfo, qemu-img map."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snapimg.cli.main import main
from tests.inspect.helpers import (
    GptDisk,
    MiB,
    blkid,
    inspect_json,
    make_ext4,
    make_fat16,
    place,
    run,
)


def _fat_free(image: Path) -> int:
    out = run("mdir", "-i", image, "::/")
    return int(re.search(r"([\d ]+) bytes free", out).group(1).replace(" ", ""))  # type: ignore[union-attr]


def _ext_free(image: Path) -> int:
    out = run("dumpe2fs", "-h", image)
    fields = dict(re.findall(r"^([^:\n]+):\s+(\S+)", out, re.M))
    return int(fields["Free blocks"]) * int(fields["Block size"])


def _ntfs_free(image: Path) -> int:
    out = run("ntfsinfo", "-m", "-f", image)
    clusters = int(re.search(r"Free Clusters:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    size = int(re.search(r"Cluster Size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    return clusters * size


def test_gpt_partitions_and_filesystems_match_sfdisk_and_blkid(
    gpt_disk: GptDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    rep: dict[str, Any] = inspect_json(gpt_disk.path, capsys)
    sf = json.loads(run("sfdisk", "-J", gpt_disk.path))["partitiontable"]
    assert rep["format"] == "raw"
    assert rep["virtual_size"] == 64 * MiB
    assert rep["partition_table"] == {"type": "gpt", "id": sf["id"], "sector_size": 512}
    assert rep["findings"] == []
    assert [p["index"] for p in rep["partitions"]] == [1, 2, 3]
    for mine, theirs in zip(rep["partitions"], sf["partitions"], strict=True):
        assert mine["start"] == theirs["start"] * 512
        assert mine["size"] == theirs["size"] * 512
        assert mine["type"] == theirs["type"]
        assert mine["uuid"] == theirs["uuid"]
        assert mine["name"] == theirs["name"]
    assert [p["type_name"] for p in rep["partitions"]] == [
        "EFI System",
        "Linux filesystem",
        "Microsoft basic data",
    ]

    free = {1: _fat_free, 2: _ext_free, 3: _ntfs_free}
    for p in rep["partitions"]:
        fs = p["filesystem"]
        ref = blkid(gpt_disk.path, p["start"])
        assert fs["type"] == ref["TYPE"]
        assert fs["label"] == ref["LABEL"]
        assert fs["uuid"] == ref["UUID"]
        assert fs["variant"] == (ref["VERSION"] if ref["TYPE"] == "vfat" else None)
        assert fs["free"] == free[p["index"]](gpt_disk.part_images[p["index"]])
        assert fs["used"] == fs["size"] - fs["free"]
        assert 0 < fs["used"] < fs["size"] <= p["size"]
    assert [p["filesystem"]["type"] for p in rep["partitions"]] == ["vfat", "ext4", "ntfs"]
    assert rep["partitions"][0]["filesystem"]["variant"] == "FAT16"
    # ext4 holds a 1.3 MB file: at least that much is in use
    assert rep["partitions"][1]["filesystem"]["used"] > 1_300_000


def test_allocation_matches_qemu_img_map(
    gpt_disk: GptDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    rep: dict[str, Any] = inspect_json(gpt_disk.path, capsys)
    qmap = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", gpt_disk.path))
    data = sum(e["length"] for e in qmap if e["data"])
    assert rep["allocation"] == {"data": data, "zero": 0, "hole": 64 * MiB - data}
    assert 0 < data < 64 * MiB


def test_human_output_is_an_aligned_table(
    gpt_disk: GptDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(gpt_disk.path)]) == 0
    out = capsys.readouterr().out
    assert "Virtual size:    64.0 MiB (67108864 bytes)" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = lines[header + 1 : header + 4]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    # every column starts at the same place in the header and in each row
    for col in ("TYPE", "FS", "LABEL", "UUID"):
        pos = lines[header].index(f" {col} ") + 1
        for r in rows:
            assert r[pos - 2 : pos] == "  " and r[pos] != " "
    assert "ntfs" in rows[2] and "FAT16" in rows[0]


def test_mbr_with_logical_partitions_numbers_like_sfdisk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(48 * MiB)
    run(
        "sfdisk",
        "-q",
        disk,
        input=(
            "label: dos\nlabel-id: 0x1234abcd\n"
            "size=8MiB, type=6, bootable\n"
            "type=5\n"
            "size=10MiB, type=83\n"
            "size=12MiB, type=c\n"
        ),
    )
    sf = json.loads(run("sfdisk", "-J", disk))["partitiontable"]
    nodes = {int(p["node"].removeprefix(str(disk))): p for p in sf["partitions"]}
    make_fat16(tmp_path / "fat.img", 8 * MiB, {"BOOT.TXT": b"boot"}, label="DOSBOOT")
    make_ext4(tmp_path / "ext.img", 10 * MiB, {"x": b"y"}, label="logical5")
    place(disk, tmp_path / "fat.img", nodes[1]["start"] * 512)
    place(disk, tmp_path / "ext.img", nodes[5]["start"] * 512)

    rep: dict[str, Any] = inspect_json(disk, capsys)
    assert rep["partition_table"]["type"] == "mbr"
    assert rep["partition_table"]["id"] == "0x1234abcd"
    assert rep["findings"] == []
    got = {p["index"]: p for p in rep["partitions"]}
    assert sorted(got) == sorted(nodes) == [1, 2, 5, 6]
    for n, theirs in nodes.items():
        assert got[n]["start"] == theirs["start"] * 512
        assert got[n]["size"] == theirs["size"] * 512
        assert got[n]["type"] == "0x" + theirs["type"].rjust(2, "0")
        assert got[n]["bootable"] == bool(theirs.get("bootable", False))
    assert got[2]["container"] is True and got[2]["filesystem"] is None
    assert got[1]["filesystem"]["label"] == "DOSBOOT"
    assert got[5]["filesystem"]["label"] == "logical5"
    assert got[6]["filesystem"] is None


def test_filesystem_on_the_whole_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "floppy.img"
    run("mkfs.fat", "-C", "-n", "FLOPPY", img, "1440")
    rep: dict[str, Any] = inspect_json(img, capsys)
    ref = blkid(img, 0)
    assert rep["partition_table"] is None and rep["partitions"] == []
    assert rep["filesystem"]["type"] == "vfat"
    assert rep["filesystem"]["variant"] == ref["VERSION"] == "FAT12"
    assert rep["filesystem"]["uuid"] == ref["UUID"]
    assert rep["filesystem"]["label"] == "FLOPPY"
    assert rep["filesystem"]["free"] == _fat_free(img)


def test_qcow2_image_is_read_through_qemu(
    gpt_disk: GptDisk, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", gpt_disk.path, q)
    rep: dict[str, Any] = inspect_json(q, capsys)
    raw: dict[str, Any] = inspect_json(gpt_disk.path, capsys)
    assert rep["format"] == "qcow2"
    assert rep["virtual_size"] == 64 * MiB
    assert rep["partitions"] == raw["partitions"]
    assert main(["checksum", str(q)]) == 0
    digest = capsys.readouterr().out.split()[0]
    assert digest == run("sha256sum", gpt_disk.path).split()[0]


def test_missing_target_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", "inspect", str(tmp_path / "nope.img")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "nope.img" in proc.stderr
