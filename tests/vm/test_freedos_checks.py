"""The rig's host-side checks catch what they claim to catch (real test disk, real mtools).

Disk states are written here the way the DOS writer writes them (freedos.records), so the
scenario checks are shown to pass on states the disk can pass through and to fail otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmtests import config
from vmtests.guests import freedos
from vmtests.scenarios import checks

RAW = 256   # sectors of the raw region used here (4 writer chunks)


@pytest.fixture
def disk(vm_settings: config.Settings, tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    shutil.copyfile(freedos.build(vm_settings).test_disk, image)
    return image


def _stamp(image: Path, first: int, count: int, gen: int) -> None:
    start, _ = freedos.read_marker(image)
    with image.open("r+b") as f:
        f.seek((start + first) * freedos.SECTOR)
        f.write(freedos.records(freedos.STAMP_MAGIC, start + first, count, gen))


def _put_file(image: Path, slot: int, data: bytes, tmp_path: Path) -> None:
    src = tmp_path / "f.dat"
    src.write_bytes(data)
    subprocess.run(["mcopy", "-o", "-i", f"{image}@@{freedos.PARTITION_OFFSET}", str(src),
                    f"::{freedos.file_name(slot)}"], check=True, env=freedos.mtools_env())


def test_test_disk_layout(disk: Path) -> None:
    start, count = freedos.read_marker(disk)
    assert start % (16 * 63) == 0 and count >= 4096
    assert (start + count) * freedos.SECTOR == disk.stat().st_size
    assert freedos.fat_list(disk) == []
    assert set(freedos.stamp_generations(disk, start, count)) == {0}


def test_snapshot_state_accepts_a_state_mid_generation(disk: Path) -> None:
    _stamp(disk, 0, RAW, 2)
    _stamp(disk, 0, 100, 3)            # generation 3 in flight, ends inside chunk 1
    assert checks.snapshot_state(disk, 3, 3, RAW) == []


def test_snapshot_state_rejects_newer_generation(disk: Path) -> None:
    _stamp(disk, 0, RAW, 4)
    problems = checks.snapshot_state(disk, 3, 3, RAW)
    assert any("newer than the generation in flight" in p for p in problems)


def test_snapshot_state_rejects_out_of_order_stamps(disk: Path) -> None:
    _stamp(disk, 0, RAW, 2)
    _stamp(disk, 192, 64, 3)           # new data after old data, beyond one chunk
    problems = checks.snapshot_state(disk, 3, 3, RAW)
    assert any("not a state the disk passed through" in p for p in problems)


def test_snapshot_state_rejects_torn_sector(disk: Path) -> None:
    _stamp(disk, 0, RAW, 2)
    start, _ = freedos.read_marker(disk)
    half = freedos.records(freedos.STAMP_MAGIC, start + 5, 1, 3)[:256]
    with disk.open("r+b") as f:
        f.seek((start + 5) * freedos.SECTOR)
        f.write(half)
    problems = checks.snapshot_state(disk, 3, 3, RAW)
    assert problems and "torn" in problems[0]


def test_all_writes_present_accepts_and_rejects(disk: Path, tmp_path: Path) -> None:
    kib = 8
    _stamp(disk, 0, RAW, 4)
    for gen in (2, 3, 4):
        _put_file(disk, freedos.file_slot(gen), freedos.expected_file(gen, kib), tmp_path)
    assert checks.all_writes_present(disk, 4, RAW, kib) == []

    _put_file(disk, freedos.file_slot(3), freedos.expected_file(0, kib), tmp_path)
    _stamp(disk, RAW - 1, 1, 3)
    problems = checks.all_writes_present(disk, 4, RAW, kib)
    assert any("lack generation 4" in p for p in problems)
    assert any("F0.DAT is not generation 3" in p for p in problems)
