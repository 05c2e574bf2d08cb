"""Scenario 3, attach-to-backup-vm.

A writer VM writes generations 1..3 and ends; the rig snapshots the origin.  Then, at the same
time, the writer VM boots again and overwrites everything (generations 4..6) while a second
FreeDOS VM boots with a blank disk as C: and the snapshot export, read-only, as its second
hard disk (D:), reads the writer's files from D: and prints their CRC-32 on COM1.  The sums
must be those of generations 1..3, which the rig computes on its own.
"""

from __future__ import annotations

import asyncio
import shutil
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from vmtests.errors import VmError
from vmtests.guests import freedos
from vmtests.machine import DiskSpec
from vmtests.scenarios.common import EXPORT, Result, Rig, boot, finish
from vmtests.server import nbd_copy

NAME = "attach-to-backup-vm"
RAW_SECTORS = 256
FILE_KIB = 128
BEFORE = (1, 3)  # generations in the snapshot
AFTER = (4, 6)  # generations written while the backup VM reads


def _export_of(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    socket = parse_qs(parsed.query).get("socket", [""])[0]
    if not socket:
        raise VmError(f"snapshot URI without a socket: {uri}")
    return socket, parsed.path.lstrip("/")


def expected_sums(first: int, last: int) -> dict[str, str]:
    sums: dict[str, str] = {}
    for gen in range(first, last + 1):
        data = freedos.expected_file(gen, FILE_KIB)
        sums[freedos.file_name(freedos.file_slot(gen))] = f"{zlib.crc32(data):08x}"
    return sums


async def _write(rig: Rig, name: str, first: int, last: int) -> None:
    machine = rig.machine(name, [freedos.writer_job(first, last, RAW_SECTORS, FILE_KIB)])
    try:
        await boot(machine)
        await finish(machine, freedos.WRITER_DONE, freedos.WRITER_FAILED, 300)
    finally:
        await machine.close()


async def _read_backup(rig: Rig, snap_uri: str) -> tuple[dict[str, str], float]:
    socket, export = _export_of(snap_uri)
    scratch = rig.workdir / "scratch.img"
    shutil.copyfile(rig.artifacts.test_disk, scratch)
    disks = [
        DiskSpec.raw_file("scratch", scratch),
        DiskSpec.nbd_unix("backup", Path(socket), export, read_only=True),
    ]
    names = [freedos.file_name(slot) for slot in range(freedos.FILE_SLOTS)]
    job = [freedos.reader_job([f"D:\\{n}" for n in names])]
    machine = rig.machine("backupvm", job, disks=disks)
    sums: dict[str, str] = {}
    try:
        boot_seconds = await boot(machine)
        for _ in names:
            match = await machine.console.expect(
                [freedos.SUM_LINE],
                [freedos.READER_FAILED, freedos.JOB_ENDED],
                timeout=120,
                phase="reading the backup",
                watch={"screen": freedos.SCREEN_FAILURES},
            )
            path, size, crc = match.group(1), int(match.group(2)), match.group(3)
            sums[path.split("\\")[-1].upper()] = crc
            if size != FILE_KIB * 1024:
                raise VmError(f"backup VM read {size} bytes from {path}")
        await finish(machine, freedos.READER_DONE, freedos.READER_FAILED, 60)
    finally:
        await machine.close()
    return sums, boot_seconds


async def run(rig: Rig) -> Result:
    result = Result(NAME, rig.controller.name)
    await _write(rig, "writer1", *BEFORE)
    snap_uri = await rig.server.snapshot_create(EXPORT, "backup")
    reader = asyncio.ensure_future(_read_backup(rig, snap_uri))
    writer = asyncio.ensure_future(_write(rig, "writer2", *AFTER))
    try:
        (sums, boot_seconds), _ = await asyncio.gather(reader, writer)
    except BaseException:
        for task in (reader, writer):  # one VM failed: stop the other one too
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
        raise
    result.facts["backup_vm_boot_seconds"] = round(boot_seconds, 2)
    want = expected_sums(*BEFORE)
    result.facts["guest_sums"] = sums
    result.facts["expected_sums"] = want
    result.check(sums == want, f"backup VM sums {sums} != generation {BEFORE} sums {want}")

    # The origin moved on meanwhile: the backup VM really read the snapshot, not the origin.
    final = rig.workdir / "origin-after.img"
    await nbd_copy(rig.server.uri(EXPORT), final)
    now = {name: f"{zlib.crc32(freedos.fat_read(final, name)):08x}" for name in want}
    result.check(now == expected_sums(*AFTER), f"origin after the second writer: {now}")
    result.check(all(now[n] != want[n] for n in want), "origin files did not change")
    return result
