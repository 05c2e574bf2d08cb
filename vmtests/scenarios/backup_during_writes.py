"""Scenario 1, backup-during-writes.

The guest's writer is running; the rig pauses the VM (QMP stop), records the origin's sha256
over NBD, creates a snapshot, resumes the VM (QMP cont).  While the guest keeps overwriting
(its raw region and files, several times over) ``qemu-img convert`` copies the snapshot,
rate-limited so the copy overlaps the writes.  The copy must hash to the recorded sha256,
and once the guest is done the origin must hold all of its writes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from vmtests.guests import freedos
from vmtests.scenarios import checks
from vmtests.scenarios.common import EXPORT, Result, Rig, boot, expect_line, finish
from vmtests.server import nbd_copy, nbd_sha256

NAME = "backup-during-writes"
FIRST_GEN, LAST_GEN = 1, 5
RAW_SECTORS = 2048  # 1 MiB of stamped sectors per generation
FILE_KIB = 128  # plus one 128 KiB file: 4.5 MiB written after the snapshot
PAUSE_AT_GEN = 2  # pause once the writer starts this generation
COPY_RATE = 2 << 20  # bytes/s for qemu-img convert -r: about 4 s for the test disk


async def run(rig: Rig) -> Result:
    result = Result(NAME, rig.controller.name)
    job = [freedos.writer_job(FIRST_GEN, LAST_GEN, RAW_SECTORS, FILE_KIB)]
    machine = rig.machine("writer", job)
    try:
        result.facts["boot_seconds"] = round(await boot(machine), 2)
        await expect_line(
            machine,
            rf"^GEN {PAUSE_AT_GEN} RAW",
            freedos.WRITER_FAILED,
            120,
            "writing before the pause",
        )
        await machine.execute("stop")
        recorded = await nbd_sha256(rig.server.uri(EXPORT))
        snap_uri = await rig.server.snapshot_create(EXPORT, "backup")
        await machine.execute("cont")
        # Copy once the guest has rewritten the whole raw region after the snapshot, and go
        # on copying (rate-limited) while it keeps rewriting it.
        await expect_line(
            machine,
            rf"^GEN {PAUSE_AT_GEN + 1} RAW",
            freedos.WRITER_FAILED,
            120,
            "rewriting after the snapshot",
        )
        result.facts["copy_started_after"] = machine.console.lines()[-1]

        copy = rig.workdir / "backup.img"
        began = time.monotonic()
        await nbd_copy(snap_uri, copy, rate_limit=COPY_RATE)
        result.facts["copy_seconds"] = round(time.monotonic() - began, 2)
        result.facts["guest_line_after_copy"] = machine.console.lines()[-1]

        result.facts["recorded_sha256"] = recorded
        result.facts["copy_sha256"] = await asyncio.to_thread(freedos.sha256_file, copy)
        result.check(
            result.facts["copy_sha256"] == recorded,
            "the backup copy differs from the origin at snapshot time",
        )
        await finish(machine, freedos.WRITER_DONE, freedos.WRITER_FAILED, 300)
        result.facts["timeline"] = [
            f"{t - began:+.2f} {line}" for t, line in machine.console.timed_lines()
        ]
    finally:
        await machine.close()

    final = rig.workdir / "origin-after.img"
    await nbd_copy(rig.server.uri(EXPORT), final)
    result.problems += checks.all_writes_present(Path(final), LAST_GEN, RAW_SECTORS, FILE_KIB)
    return result
