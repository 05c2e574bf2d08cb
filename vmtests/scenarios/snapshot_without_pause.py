"""Scenario 2, snapshot-without-pause.

Snapshots are taken while the guest writes, without pausing it, at several points of its
work (inside raw writes, inside file writes): the writer runs 120 generations (FreeDOS
under TCG writes 6 (IDE) to 60 (megasas) a second here, so a snapshot lands within a few
generations of its trigger line and the writer is still busy for all three).  Each
snapshot, copied with ``qemu-img convert``, must be a state the disk really passed through:
no stamp newer than the generation in flight at snapshot time, no torn sector, stamps in
writer order; every file the writer had finished before the point the stamps show is
exact and no other exists (only the file being written there may be mid-write:
checks.snapshot_files).
"""

from __future__ import annotations

import re

from vmtests.guests import freedos
from vmtests.scenarios import checks
from vmtests.scenarios.common import EXPORT, Result, Rig, boot, expect_line, finish
from vmtests.server import nbd_copy

NAME = "snapshot-without-pause"
FIRST_GEN, LAST_GEN = 1, 120
RAW_SECTORS = 1024
FILE_KIB = 128
# Take a snapshot as soon as each of these lines appears.
TRIGGERS = (r"^GEN 5 RAW", r"^GEN 30 FILE", r"^GEN 60 RAW")
_GEN_LINE = re.compile(r"^GEN (\d+) ")


def _newest_gen(lines: list[str]) -> int:
    gens = [int(m.group(1)) for line in lines if (m := _GEN_LINE.match(line))]
    return max(gens, default=0)


async def run(rig: Rig) -> Result:
    result = Result(NAME, rig.controller.name)
    job = [freedos.writer_job(FIRST_GEN, LAST_GEN, RAW_SECTORS, FILE_KIB)]
    machine = rig.machine("writer", job)
    taken: list[tuple[str, str, int, int]] = []
    try:
        result.facts["boot_seconds"] = round(await boot(machine), 2)
        for index, trigger in enumerate(TRIGGERS):
            await expect_line(machine, trigger, freedos.WRITER_FAILED, 120, f"until {trigger}")
            gen_lo = _newest_gen(machine.console.lines())
            snap = f"live{index}"
            uri = await rig.server.snapshot_create(EXPORT, snap)
            # every line the guest printed before the snapshot (WRITER prints "GEN g RAW"
            # before it writes generation g), however far behind the console reader is
            await machine.console.catch_up()
            gen_hi = _newest_gen(machine.console.lines())
            taken.append((snap, uri, gen_lo, gen_hi))
        await finish(machine, freedos.WRITER_DONE, freedos.WRITER_FAILED, 300)
    finally:
        await machine.close()

    for snap, uri, gen_lo, gen_hi in taken:
        copy = rig.workdir / f"{snap}.img"
        await nbd_copy(uri, copy)
        problems = checks.snapshot_state(copy, gen_lo, gen_hi, RAW_SECTORS, FILE_KIB, FIRST_GEN)
        result.problems += [f"{snap}: {p}" for p in problems]
        result.facts[snap] = {"generation_in_flight": [gen_lo, gen_hi]}
        await rig.server.snapshot_drop(EXPORT, snap)
    return result
