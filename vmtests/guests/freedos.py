"""FreeDOS guests: building the boot floppy and test disk, the guest's jobs, and reading
what the DOS writer left on a disk.

The recipe and the DOS programs live in images/freedos/ (see docs/vmtests.md for the formats).
Built artefacts are cached under ``<cache_dir>/freedos-<hash of inputs>/``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapimg.errors import UsageError
from vmtests.config import REPO, Settings
from vmtests.errors import VmError

SOURCES = REPO / "images" / "freedos"
SECTOR = 512
PARTITION_OFFSET = 63 * SECTOR  # the FAT16 partition, for mtools: IMAGE@@32256
MARKER = b"SNAPIMG-TESTDISK"
MARKER_OFFSET = 0x100
FILE_SLOTS = 3  # the writer rewrites C:\F<gen % 3>.DAT
STAMP_MAGIC = b"STMP"
FILE_MAGIC = b"FDAT"
RECORD = struct.Struct("<4sIII")
RECORDS_PER_SECTOR = SECTOR // RECORD.size
SCRAMBLE = 0xA5A5A5A5

# Lines the guest prints.
BOOTED = r"^SNAPIMG BOOTED"
JOB_ENDED = r"^SNAPIMG JOB-ENDED"  # the job returned to DOS instead of ending QEMU
GEN_RAW = re.compile(r"^GEN (\d+) RAW")
GEN_DONE = re.compile(r"^GEN (\d+) DONE")
WRITER_DONE = r"^WRITER DONE"
WRITER_FAILED = r"^WRITER ERROR"
READER_DONE = r"^READER DONE"
READER_FAILED = r"^READER ERROR"
SUM_LINE = re.compile(r"^SUM (\S+) (\d+) ([0-9a-f]{8})")
# FreeDOS/FreeCOM on the screen (COM2 through SeaBIOS sercon) when something is wrong.
SCREEN_FAILURES = (
    r"Bad command or file name",
    r"General failure",
    r"Abort, Retry",
    r"Bad or missing",
    r"Invalid drive",
)
SERIAL_PORTS = ("com1", "screen")  # COM1: our programs; COM2: SeaBIOS copy of the screen
CLEAN_EXIT = 1  # isa-debug-exit with 0: QEMU status (0 << 1) | 1


@dataclass(frozen=True)
class Artifacts:
    boot_floppy: Path
    test_disk: Path

    def disk_layout(self) -> tuple[int, int]:
        return read_marker(self.test_disk)


def _inputs_key(image_sha256: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(Path(__file__).read_bytes())  # prefill_raw_region and formats
    digest.update(image_sha256.encode())
    return digest.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build(settings: Settings) -> Artifacts:
    """The boot floppy and the blank test disk, built once per set of inputs."""
    image = settings.freedos_image
    if not image.is_file():
        raise UsageError(
            f"FreeDOS boot floppy not found: {image} (set SNAPIMG_FREEDOS_IMAGE; "
            "see docs/vmtests.md)"
        )
    got = sha256_file(image)
    if settings.freedos_sha256 is not None and got != settings.freedos_sha256:
        raise UsageError(
            f"FreeDOS boot floppy {image} has sha256 {got}, expected "
            f"{settings.freedos_sha256} (SNAPIMG_FREEDOS_SHA256)"
        )
    out = settings.cache_dir / f"freedos-{_inputs_key(got)}"
    artifacts = Artifacts(out / "boot.img", out / "testdisk.img")
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with (settings.cache_dir / ".freedos.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build once
        if not out.is_dir():
            staging = out.with_name(out.name + ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            result = subprocess.run(
                ["bash", str(SOURCES / "build.sh"), str(image), str(staging)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                raise VmError(f"building FreeDOS images failed: {result.stderr.strip()}")
            prefill_raw_region(staging / "testdisk.img")
            staging.rename(out)
    return artifacts


def prefill_raw_region(image: Path) -> None:
    """Stamp the whole raw region with generation 0: the disk then holds data everywhere
    (a backup copies all of it, not only what the guest wrote) and every raw sector of a
    healthy disk is a whole stamp."""
    start, count = read_marker(image)
    with image.open("r+b") as f:
        f.seek(start * SECTOR)
        for first in range(start, start + count, 2048):
            f.write(records(STAMP_MAGIC, first, min(2048, start + count - first), 0))


def make_floppy(artifacts: Artifacts, dest: Path, job: Sequence[str]) -> Path:
    """A copy of the boot floppy whose A:\\JOB.BAT runs ``job`` (DOS command lines)."""
    shutil.copyfile(artifacts.boot_floppy, dest)
    job_file = dest.with_suffix(".bat")
    job_file.write_bytes("".join(line + "\r\n" for line in job).encode("ascii"))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(
        ["mcopy", "-o", "-i", str(dest), str(job_file), "::JOB.BAT"],
        check=True,
        capture_output=True,
        env=env,
        timeout=30,
    )
    return dest


def guest_args(run_dir: Path) -> list[str]:
    """QEMU arguments every FreeDOS guest needs: sercon on COM2, isa-debug-exit."""
    sercon = run_dir / "sercon-port.bin"
    sercon.write_bytes(struct.pack("<H", 0x2F8))
    return [
        "-fw_cfg",
        f"name=etc/sercon-port,file={sercon}",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]


def writer_job(first: int, last: int, raw_sectors: int, file_kib: int) -> str:
    return f"A:\\WRITER.COM {first} {last} {raw_sectors} {file_kib}"


def reader_job(paths: Sequence[str]) -> str:
    return "A:\\READER.COM " + " ".join(paths)


def file_slot(gen: int) -> int:
    return gen % FILE_SLOTS


def file_name(slot: int) -> str:
    return f"F{slot}.DAT"


# ---- what the writer leaves on a disk ---------------------------------------------------


def read_marker(image: Path) -> tuple[int, int]:
    """(first LBA, sector count) of the raw region, from the marker in sector 0."""
    with image.open("rb") as f:
        sector0 = f.read(SECTOR)
    return parse_marker(sector0)


def parse_marker(sector0: bytes) -> tuple[int, int]:
    marker = sector0[MARKER_OFFSET : MARKER_OFFSET + len(MARKER)]
    if marker != MARKER:
        raise VmError("sector 0 carries no SNAPIMG-TESTDISK marker")
    start, count = struct.unpack_from("<II", sector0, MARKER_OFFSET + len(MARKER))
    return start, count


def records(magic: bytes, first_index: int, count: int, gen: int) -> bytes:
    """``count`` sectors exactly as the writer fills them."""
    out = bytearray()
    for index in range(first_index, first_index + count):
        out += RECORD.pack(magic, index, gen, index ^ gen ^ SCRAMBLE) * RECORDS_PER_SECTOR
    return bytes(out)


def expected_file(gen: int, file_kib: int) -> bytes:
    return records(FILE_MAGIC, 0, file_kib * 1024 // SECTOR, gen)


class TornSector(VmError):
    """A sector that is neither blank nor one whole stamp."""


def sector_generation(data: bytes, magic: bytes, index: int) -> int:
    """The generation stamped in one sector (0 for a blank one or the build's generation-0
    stamp); TornSector otherwise."""
    if data == bytes(SECTOR):
        return 0
    first = data[: RECORD.size]
    got_magic, got_index, gen, check = RECORD.unpack(first)
    if got_magic != magic or got_index != index or check != index ^ gen ^ SCRAMBLE:
        raise TornSector(f"sector {index}: not a {magic.decode()} stamp: {first.hex()}")
    if data != first * RECORDS_PER_SECTOR:
        raise TornSector(f"sector {index}: torn (records differ within the sector)")
    return int(gen)


def stamp_generations(image: Path, start: int, count: int) -> list[int]:
    """Generation of every sector of the raw region [start, start+count)."""
    gens: list[int] = []
    with image.open("rb") as f:
        f.seek(start * SECTOR)
        data = f.read(count * SECTOR)
    if len(data) != count * SECTOR:
        raise VmError(f"{image}: raw region beyond the end of the image")
    for i in range(count):
        gens.append(sector_generation(data[i * SECTOR : (i + 1) * SECTOR], STAMP_MAGIC, start + i))
    return gens


def file_generation(data: bytes) -> int:
    """The one generation a whole writer file holds; VmError if it mixes or is damaged."""
    if not data or len(data) % SECTOR:
        raise VmError(f"writer file of {len(data)} bytes (not whole sectors)")
    gens = {
        sector_generation(data[i * SECTOR : (i + 1) * SECTOR], FILE_MAGIC, i)
        for i in range(len(data) // SECTOR)
    }
    if len(gens) != 1 or 0 in gens:
        raise VmError(f"writer file mixes generations {sorted(gens)}")
    return gens.pop()


def mtools_env() -> dict[str, str]:
    return dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="1")


def fat_list(image: Path) -> list[str]:
    """Names of the files in the FAT16 partition's root directory (mdir must succeed)."""
    result = subprocess.run(
        ["mdir", "-b", "-i", f"{image}@@{PARTITION_OFFSET}", "::"],
        capture_output=True,
        text=True,
        env=mtools_env(),
        timeout=30,
    )
    if result.returncode != 0:
        raise VmError(f"mdir {image}: {result.stderr.strip()}")
    return sorted(
        line.strip().split("/")[-1].upper() for line in result.stdout.splitlines() if line.strip()
    )


def fat_read(image: Path, name: str) -> bytes:
    result = subprocess.run(
        ["mcopy", "-n", "-i", f"{image}@@{PARTITION_OFFSET}", f"::{name}", "-"],
        capture_output=True,
        env=mtools_env(),
        timeout=30,
    )
    if result.returncode != 0:
        raise VmError(f"mcopy {name} from {image}: {result.stderr.decode().strip()}")
    return result.stdout
