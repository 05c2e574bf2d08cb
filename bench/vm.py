"""Benchmark of the FreeDOS VM rig: boot time and guest write throughput per controller.

For each controller, a FreeDOS guest boots (launch of QEMU to the AUTOEXEC line) and runs the
DOS writer for a few generations on the test disk, served by ``snapimg serve`` over NBD
(``--disk serve``), attached as a plain raw file (``--disk file``, QEMU's own I/O, for
comparison) or served by nbdkit's file plugin (``--disk nbdkit``: another NBD server in C,
to tell the cost of any NBD round trip from snapimg's own).  Throughput is measured from
the arrival times of the writer's COM1 lines: raw INT 13h writes (first generation = first
touch, later ones = overwrites) and file writes through DOS (INT 21h).  Acceleration comes
from SNAPIMG_ACCEL (tcg by default).

The guest's disk requests are small and one at a time (QEMU's IDE turns each sector of a
PIO write into its own request), so each costs a round trip to the server: the figures
follow the machine's load closely.  ``--repeat`` runs every controller and disk kind that
many times, taking turns (the order alternates), and reports the medians; with ``--disk
both`` the ``ratios`` are serve / file per round, their median (the target for IDE raw
writes is 0.8); ``--disk all`` adds nbdkit, and its ratios nbdkit / file.  ``--datapath``
picks snapimg serve's data path (SNAPIMG_DATAPATH).

    python bench/vm.py [--controllers ide,lsi] [--disk serve|file|nbdkit|both|all]
                       [--repeat 3] [--datapath compiled|python] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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
RAW_SECTORS = 12288  # 6 MiB per generation (the test disk's raw region holds 14112)
FILE_KIB = 1024  # 1 MiB file per generation
MIB = 1 << 20


async def measure(
    settings: config.Settings, controller: str, disk_kind: str, work: Path
) -> dict[str, object]:
    artifacts = freedos.build(settings)
    origin = work / "origin.img"
    shutil.copyfile(artifacts.test_disk, origin)
    server: SnapimgServer | None = None
    nbdkit: asyncio.subprocess.Process | None = None
    datapath = "-"
    if disk_kind == "nbdkit":
        sock = work / "nbdkit.sock"
        nbdkit = await asyncio.create_subprocess_exec(
            "nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", str(origin),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(500):
            if sock.exists() or nbdkit.returncode is not None:
                break
            await asyncio.sleep(0.01)
        if not sock.exists():
            raise SystemExit("bench/vm.py: nbdkit did not start")
        disk = DiskSpec.nbd_unix("d0", sock, "")
    elif disk_kind == "serve":
        server = SnapimgServer(settings, {"disk": origin}, work / "logs")
        await server.start()
        ready = re.search(r"datapath=(\w+)", server.log_path.read_text())
        datapath = ready.group(1) if ready else "?"
        disk = DiskSpec.nbd_unix("d0", server.socket, "disk")
    else:
        disk = DiskSpec.raw_file("d0", origin)
    job = [freedos.writer_job(1, GENS, RAW_SECTORS, FILE_KIB)]
    machine = Machine(
        name="bench",
        settings=settings,
        log_dir=work / "logs",
        controller=controllers.get(controller),
        disks=[disk],
        serial_ports=freedos.SERIAL_PORTS,
        extra_args=freedos.guest_args(work),
        floppy=freedos.make_floppy(artifacts, work / "floppy.img", job),
    )
    try:
        began = time.monotonic()
        await machine.start()
        await machine.console.expect([freedos.BOOTED], timeout=120, phase="boot")
        booted = time.monotonic() - began
        await machine.console.expect(
            [freedos.WRITER_DONE], [freedos.WRITER_FAILED], timeout=900, phase="workload"
        )
        await machine.wait_exit(30)
        lines = machine.console.timed_lines()
    finally:
        await machine.close()
        if server is not None:
            await server.stop()
        if nbdkit is not None:
            nbdkit.terminate()
            await nbdkit.wait()
    at = {line.strip(): t for t, line in lines}
    raw = [
        RAW_SECTORS * 512 / MIB / (at[f"GEN {g} FILE F{g % 3}.DAT"] - at[f"GEN {g} RAW"])
        for g in range(1, GENS + 1)
    ]
    files = [
        FILE_KIB / 1024 / (at[f"GEN {g} DONE"] - at[f"GEN {g} FILE F{g % 3}.DAT"])
        for g in range(1, GENS + 1)
    ]
    return {
        "controller": controller,
        "disk": disk_kind,
        "datapath": datapath,
        "accel": settings.accel,
        "boot_s": round(booted, 2),
        "raw_first_touch_mib_s": round(raw[0], 2),
        "raw_overwrite_mib_s": round(statistics.median(raw[1:]), 2),
        "file_mib_s": round(statistics.median(files), 2),
    }


RATES = ("raw_first_touch_mib_s", "raw_overwrite_mib_s", "file_mib_s")


def summarise(rows: list[dict[str, object]]) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Median rates per controller and disk kind; per controller, the median over rounds
    of serve / file (and nbdkit / file) for each rate (keys
    "<controller>_<rate>_<kind>_vs_file")."""
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["controller"]), str(row["disk"])), []).append(row)
    medians = [
        {
            "controller": c,
            "disk": d,
            "runs": len(rs),
            **{
                k: round(statistics.median(float(str(r[k])) for r in rs), 2)
                for k in ("boot_s", *RATES)
            },
        }
        for (c, d), rs in groups.items()
    ]
    ratios: dict[str, float] = {}
    for (c, d), rs in groups.items():
        if d == "file" or (c, "file") not in groups:
            continue
        for k in RATES:
            per_round = [
                float(str(s[k])) / float(str(f[k]))
                for s, f in zip(rs, groups[c, "file"], strict=False)
            ]
            ratios[f"{c}_{k.removesuffix('_mib_s')}_{d}_vs_file"] = round(
                statistics.median(per_round), 3
            )
    return medians, ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controllers", default=",".join(controllers.CONTROLLERS))
    parser.add_argument(
        "--disk", choices=["serve", "file", "nbdkit", "both", "all"], default="serve"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds (default 1)")
    parser.add_argument(
        "--datapath",
        choices=["compiled", "python"],
        default=None,
        help="snapimg serve's data path (default: $SNAPIMG_DATAPATH or compiled)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = config.load()
    if reason := settings.accel_unusable():
        print(f"bench/vm.py: {reason}", file=sys.stderr)
        return 1
    if args.repeat < 1:
        print(f"bench/vm.py: bad --repeat {args.repeat}: must be at least 1", file=sys.stderr)
        return 1
    if args.datapath:
        os.environ["SNAPIMG_DATAPATH"] = args.datapath  # inherited by snapimg serve
    kinds = {"both": ["serve", "file"], "all": ["serve", "file", "nbdkit"]}.get(
        args.disk, [args.disk]
    )
    rows = []
    for rnd in range(args.repeat):
        for controller in args.controllers.split(","):
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                with tempfile.TemporaryDirectory(prefix="bench-vm-") as work:
                    rows.append(asyncio.run(measure(settings, controller, kind, Path(work))))
                if not args.json:
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    medians, ratios = summarise(rows)
    if args.json:
        print(
            json.dumps(
                {
                    "gens": GENS,
                    "raw_mib_per_gen": RAW_SECTORS * 512 / MIB,
                    "file_mib_per_gen": FILE_KIB / 1024,
                    "repeat": args.repeat,
                    "results": rows,
                    "medians": medians,
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    else:
        if args.repeat > 1:
            for row in medians:
                print("median " + " ".join(f"{k}={v}" for k, v in row.items()))
        for k, v in ratios.items():
            print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
