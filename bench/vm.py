"""Benchmark of the FreeDOS VM rig: boot time and guest write throughput per controller.

For each controller, a FreeDOS guest boots (launch of QEMU to the AUTOEXEC line) and runs the
DOS writer for a few generations on the test disk, served by ``snapimg serve`` over NBD
(``--disk serve``) or attached as a plain raw file (``--disk file``, QEMU's own I/O, for
comparison).  Throughput is measured from the arrival times of the writer's COM1 lines:
raw INT 13h writes (first generation = first touch, later ones = overwrites) and file writes
through DOS (INT 21h).  Acceleration comes from SNAPIMG_ACCEL (tcg by default).

    python bench/vm.py [--controllers ide,lsi] [--disk serve|file|both] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vmtests import config, controllers
from vmtests.guests import freedos
from vmtests.machine import DiskSpec, Machine
from vmtests.server import SnapimgServer

GENS = 4
RAW_SECTORS = 4096          # 2 MiB per generation
FILE_KIB = 1024             # 1 MiB file per generation
MIB = 1 << 20


async def measure(settings: config.Settings, controller: str, disk_kind: str,
                  work: Path) -> dict[str, object]:
    artifacts = freedos.build(settings)
    origin = work / "origin.img"
    shutil.copyfile(artifacts.test_disk, origin)
    server: SnapimgServer | None = None
    if disk_kind == "serve":
        server = SnapimgServer(settings, {"disk": origin}, work / "logs")
        await server.start()
        disk = DiskSpec.nbd_unix("d0", server.socket, "disk")
    else:
        disk = DiskSpec.raw_file("d0", origin)
    job = [freedos.writer_job(1, GENS, RAW_SECTORS, FILE_KIB)]
    machine = Machine(name="bench", settings=settings, log_dir=work / "logs",
                      controller=controllers.get(controller), disks=[disk],
                      serial_ports=freedos.SERIAL_PORTS, extra_args=freedos.guest_args(work),
                      floppy=freedos.make_floppy(artifacts, work / "floppy.img", job))
    try:
        began = time.monotonic()
        await machine.start()
        await machine.console.expect([freedos.BOOTED], timeout=120, phase="boot")
        booted = time.monotonic() - began
        await machine.console.expect([freedos.WRITER_DONE], [freedos.WRITER_FAILED],
                                     timeout=900, phase="workload")
        await machine.wait_exit(30)
        lines = machine.console.timed_lines()
    finally:
        await machine.close()
        if server is not None:
            await server.stop()
    at = {line.strip(): t for t, line in lines}
    raw = [RAW_SECTORS * 512 / MIB / (at[f"GEN {g} FILE F{g % 3}.DAT"] - at[f"GEN {g} RAW"])
           for g in range(1, GENS + 1)]
    files = [FILE_KIB / 1024 / (at[f"GEN {g} DONE"] - at[f"GEN {g} FILE F{g % 3}.DAT"])
             for g in range(1, GENS + 1)]
    return {"controller": controller, "disk": disk_kind, "accel": settings.accel,
            "boot_s": round(booted, 2),
            "raw_first_touch_mib_s": round(raw[0], 2),
            "raw_overwrite_mib_s": round(statistics.median(raw[1:]), 2),
            "file_mib_s": round(statistics.median(files), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controllers", default=",".join(controllers.CONTROLLERS))
    parser.add_argument("--disk", choices=["serve", "file", "both"], default="serve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = config.load()
    if reason := settings.accel_unusable():
        print(f"bench/vm.py: {reason}", file=sys.stderr)
        return 1
    kinds = ["serve", "file"] if args.disk == "both" else [args.disk]
    rows = []
    for controller in args.controllers.split(","):
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix="bench-vm-") as work:
                rows.append(asyncio.run(measure(settings, controller, kind, Path(work))))
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if args.json:
        print(json.dumps({"gens": GENS, "raw_mib_per_gen": RAW_SECTORS * 512 / MIB,
                          "file_mib_per_gen": FILE_KIB / 1024, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
