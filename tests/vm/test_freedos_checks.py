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
from vmtests.errors import VmError
from vmtests.guests import freedos
from vmtests.scenarios import checks

RAW = 256  # sectors of the raw region used here (4 writer chunks)
KIB = 8  # file size used here


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
    subprocess.run(
        [
            "mcopy",
            "-o",
            "-i",
            f"{image}@@{freedos.PARTITION_OFFSET}",
            str(src),
            f"::{freedos.file_name(slot)}",
        ],
        check=True,
        env=freedos.mtools_env(),
    )


def test_test_disk_layout(disk: Path) -> None:
    start, count = freedos.read_marker(disk)
    assert start % (16 * 63) == 0 and count >= 4096
    assert (start + count) * freedos.SECTOR == disk.stat().st_size
    assert freedos.fat_list(disk) == []
    assert set(freedos.stamp_generations(disk, start, count)) == {0}


def _fat_region(image: Path) -> tuple[int, int]:
    """Offset and length of the FAT16 partition's FATs (from its boot sector)."""
    with image.open("rb") as f:
        f.seek(freedos.PARTITION_OFFSET)
        boot = f.read(512)
    sector = int.from_bytes(boot[11:13], "little")
    reserved, fats = int.from_bytes(boot[14:16], "little"), boot[16]
    per_fat = int.from_bytes(boot[22:24], "little")
    return freedos.PARTITION_OFFSET + reserved * sector, fats * per_fat * sector


def _dir_entry_before_fat(image: Path, slot: int, data: bytes, tmp_path: Path) -> None:
    """The state DOS passes through when it writes a new file's directory entry before the
    file's FAT chain: the entry names a first cluster the FAT still calls free."""
    offset, length = _fat_region(image)
    with image.open("rb") as f:
        f.seek(offset)
        fat = f.read(length)
    _put_file(image, slot, data, tmp_path)
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(fat)


def _finished(image: Path, gens: range, tmp_path: Path) -> None:
    for gen in gens:
        _put_file(image, freedos.file_slot(gen), freedos.expected_file(gen, KIB), tmp_path)


def test_snapshot_state_accepts_a_file_in_flight_mid_close(disk: Path, tmp_path: Path) -> None:
    _stamp(disk, 0, RAW, 3)  # generation 3's raw writes done
    _finished(disk, range(1, 3), tmp_path)  # F1.DAT, F2.DAT done
    _dir_entry_before_fat(disk, freedos.file_slot(3), freedos.expected_file(3, KIB), tmp_path)
    with pytest.raises(VmError, match="Fat problem"):  # mtools cannot read F0.DAT
        freedos.fat_read(disk, "F0.DAT")
    assert checks.snapshot_state(disk, 3, 3, RAW, KIB) == []


def test_snapshot_state_rejects_a_file_of_a_generation_not_begun(
    disk: Path, tmp_path: Path
) -> None:
    _stamp(disk, 0, RAW, 2)
    _stamp(disk, 0, 100, 3)  # inside generation 3's raw writes
    _finished(disk, range(1, 3), tmp_path)
    _dir_entry_before_fat(disk, freedos.file_slot(3), freedos.expected_file(3, KIB), tmp_path)
    problems = checks.snapshot_state(disk, 3, 3, RAW, KIB)
    assert problems == [
        "snapshot FAT: F0.DAT exists, but no generation wrote it (generations 1..2 finished)"
    ]


def test_snapshot_files_rejects_finished_files_missing_or_stale(disk: Path, tmp_path: Path) -> None:
    _finished(disk, range(1, 3), tmp_path)
    assert checks.snapshot_files(disk, 2, 3, KIB) == []
    _put_file(disk, freedos.file_slot(2), freedos.expected_file(1, KIB), tmp_path)
    problems = checks.snapshot_files(disk, 2, 3, KIB)
    assert problems == [
        "snapshot FAT: F2.DAT is not generation 2's content "
        "(generations 1..2 finished, 3's file in flight)"
    ]
    problems = checks.snapshot_files(disk, 3, None, KIB)  # gen 3 wrote F0.DAT: missing
    assert any("F0.DAT missing" in p for p in problems), problems


def test_snapshot_state_accepts_a_state_mid_generation(disk: Path, tmp_path: Path) -> None:
    _finished(disk, range(1, 3), tmp_path)
    _stamp(disk, 0, RAW, 2)
    _stamp(disk, 0, 100, 3)  # generation 3 in flight, ends inside chunk 1
    assert checks.snapshot_state(disk, 3, 3, RAW, KIB) == []


def test_snapshot_state_rejects_newer_generation(disk: Path) -> None:
    _stamp(disk, 0, RAW, 4)
    problems = checks.snapshot_state(disk, 3, 3, RAW, KIB)
    assert any("newer than the generation in flight" in p for p in problems)


def test_snapshot_state_rejects_out_of_order_stamps(disk: Path) -> None:
    _stamp(disk, 0, RAW, 2)
    _stamp(disk, 192, 64, 3)  # new data after old data, beyond one chunk
    problems = checks.snapshot_state(disk, 3, 3, RAW, KIB)
    assert any("not a state the disk passed through" in p for p in problems)


def test_snapshot_state_rejects_torn_sector(disk: Path) -> None:
    _stamp(disk, 0, RAW, 2)
    start, _ = freedos.read_marker(disk)
    half = freedos.records(freedos.STAMP_MAGIC, start + 5, 1, 3)[:256]
    with disk.open("r+b") as f:
        f.seek((start + 5) * freedos.SECTOR)
        f.write(half)
    problems = checks.snapshot_state(disk, 3, 3, RAW, KIB)
    assert problems and "torn" in problems[0]


def test_all_writes_present_accepts_and_rejects(disk: Path, tmp_path: Path) -> None:
    kib = KIB
    _stamp(disk, 0, RAW, 4)
    for gen in (2, 3, 4):
        _put_file(disk, freedos.file_slot(gen), freedos.expected_file(gen, kib), tmp_path)
    assert checks.all_writes_present(disk, 4, RAW, kib) == []

    _put_file(disk, freedos.file_slot(3), freedos.expected_file(0, kib), tmp_path)
    _stamp(disk, RAW - 1, 1, 3)
    problems = checks.all_writes_present(disk, 4, RAW, kib)
    assert any("lack generation 4" in p for p in problems)
    assert any("F0.DAT is not generation 3" in p for p in problems)
