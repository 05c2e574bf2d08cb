"""Damaged partition tables and filesystems are findings in the report, never a crash."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snapimg.errors import SnapimgError
from snapimg.inspect.image import inspect_source
from snapimg.inspect.source import FileSource
from tests.inspect.helpers import GptDisk, MiB, inspect_json, make_ext4, place, run


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _messages(rep: dict[str, Any]) -> list[str]:
    return [f"{f['severity']}: {f['where']}: {f['message']}" for f in rep["findings"]]


@pytest.fixture
def disk(gpt_disk: GptDisk, tmp_path: Path) -> Path:
    copy = tmp_path / "disk.img"
    run("cp", "--sparse=always", gpt_disk.path, copy)
    return copy


def test_damaged_primary_gpt_falls_back_to_the_backup(
    disk: Path, gpt_disk: GptDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    good: dict[str, Any] = inspect_json(gpt_disk.path, capsys)
    _poke(disk, 512 + 24, b"\xff")  # inside the primary header: its CRC no longer matches
    rep: dict[str, Any] = inspect_json(disk, capsys)
    assert _messages(rep) == [
        "error: disk: primary GPT header: CRC mismatch",
        "error: disk: primary GPT header damaged: using the backup",
    ]
    assert rep["partitions"] == good["partitions"]


def test_damaged_gpt_entries_and_missing_backup(
    disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _poke(disk, 2 * 512 + 128 + 60, b"X")  # a name character of entry 2
    with open(disk, "r+b") as f:
        f.truncate(50 * MiB)  # the backup GPT at the end is gone; partition 3 is cut short
    rep: dict[str, Any] = inspect_json(disk, capsys)
    msgs = _messages(rep)
    assert "warning: disk: backup GPT header missing or damaged" in msgs
    assert "error: disk: GPT entry array: CRC mismatch" in msgs
    assert "error: partition 3: extends beyond the end of the disk" in msgs
    assert (
        "warning: disk: the GPT was made for a disk of 131072 sectors; this one has 102400"
    ) in msgs
    assert rep["partitions"][1]["name"] == "roXt fs"
    assert rep["partitions"][0]["filesystem"]["type"] == "vfat"


def test_damaged_filesystems(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good: dict[str, Any] = inspect_json(disk, capsys)
    fat, ext = good["partitions"][0]["start"], good["partitions"][1]["start"]
    _poke(disk, fat + 11, b"\x00\x00")  # FAT: 0 bytes per sector
    _poke(disk, ext + 1024 + 32, struct.pack("<I", 0))  # ext: 0 blocks per group
    rep: dict[str, Any] = inspect_json(disk, capsys)
    assert rep["partitions"][0]["filesystem"] is None
    assert rep["partitions"][1]["filesystem"] is None
    assert rep["partitions"][2]["filesystem"]["type"] == "ntfs"
    msgs = _messages(rep)
    assert len(msgs) == 2
    assert msgs[0].startswith("error: partition 1: damaged fat filesystem")
    assert msgs[1].startswith("error: partition 2: damaged ext filesystem")
    proc = subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", "ls", f"{disk}:2", "/"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "partition 2" in proc.stderr and "Traceback" not in proc.stderr


def test_ebr_loop_is_a_finding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
    run("sfdisk", "-q", disk, input="label: dos\ntype=5\nsize=4MiB, type=83\nsize=4MiB, type=83\n")
    make_ext4(tmp_path / "e.img", 4 * MiB, {"f": b"1"})
    ext_start = 2048 * 512
    place(disk, tmp_path / "e.img", ext_start + 2048 * 512)
    # the second EBR's "next" entry points back at the first EBR (relative start 0)
    second_ebr = ext_start + 4 * MiB + 2048 * 512
    sector = bytearray(disk.read_bytes()[second_ebr : second_ebr + 512])
    assert sector[510:] == b"\x55\xaa"
    sector[446 + 16 : 446 + 32] = bytes([0, 0, 0, 0, 5, 0, 0, 0]) + struct.pack("<II", 0, 100)
    _poke(disk, second_ebr, bytes(sector))
    rep: dict[str, Any] = inspect_json(disk, capsys)
    assert [p["index"] for p in rep["partitions"]] == [1, 5, 6]
    assert any("EBR chain loops" in m for m in _messages(rep))
    assert rep["partitions"][1]["filesystem"]["type"] == "ext4"


def test_random_damage_never_crashes(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good: dict[str, Any] = inspect_json(disk, capsys)
    regions = [(0, 34 * 512)] + [(p["start"], 8192) for p in good["partitions"]]
    rnd = random.Random(11)
    with open(disk, "r+b") as f:
        for _ in range(40):
            start, length = rnd.choice(regions)
            pokes = [
                (start + rnd.randrange(length), rnd.randbytes(rnd.randint(1, 8)))
                for _ in range(rnd.randint(1, 6))
            ]
            saved = []
            for off, data in pokes:
                f.seek(off)
                saved.append((off, f.read(len(data))))
                f.seek(off)
                f.write(data)
            f.flush()
            with FileSource(disk) as src:
                try:
                    rep = inspect_source(src)
                except SnapimgError:
                    rep = None  # a clean refusal is fine; any other exception fails the test
            if rep is not None:
                assert rep["virtual_size"] == 64 * MiB
            for off, data in reversed(saved):
                f.seek(off)
                f.write(data)


def test_mbr_with_a_bad_boot_flag_is_a_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    run("sfdisk", "-q", disk, input="label: dos\ntype=83\n")
    _poke(disk, 446, b"\x12")  # boot flag must be 0x00 or 0x80
    rep: dict[str, Any] = inspect_json(disk, capsys)
    assert rep["partition_table"] is None and rep["filesystem"] is None
    assert _messages(rep) == [
        "warning: disk: sector 0 has a boot signature but no valid partition table or filesystem"
    ]
