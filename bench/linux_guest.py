"""Benchmark of the Linux guest: boot-to-SSH time and backup throughput (TCG unless SNAPIMG_ACCEL).

Runs the Linux scenarios of tests/vm/test_linux_guest.py once per (driver, controller) pair and
the libvirt pull-backup scenario, and reports what they measured: seconds from VM start to a
working SSH session (writer and backup VM), MiB/s of the host's read of the snapshot (snapimg
serve over NBD, or libvirt's pull-backup export copied with qemu-img convert), MiB/s of the
backup VM hashing the whole snapshot device, and e2fsck's exit status.

    python bench/linux_guest.py [--drivers qemu,libvirt] [--controllers lsi,ide] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from vmtests import config, controllers
from vmtests.libvirt_driver import Libvirtd
from vmtests.scenarios import linux_backup_vm as scenario

KEYS = [
    "writer_boot_to_ssh_s",
    "backup_boot_to_ssh_s",
    "host_read_mib_s",
    "guest_hash_mib_s",
    "e2fsck_status",
    "done_ops_in_snapshot",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", default="qemu,libvirt")
    parser.add_argument("--controllers", default="lsi,ide")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = config.load()
    drivers = [d for d in args.drivers.split(",") if d]
    daemon = Libvirtd.ensure() if "libvirt" in drivers else None
    rows = []
    try:
        for driver in drivers:
            for name in args.controllers.split(","):
                ctl = controllers.get(name)
                with tempfile.TemporaryDirectory(prefix="bench-linux-") as tmp:
                    work, logs = Path(tmp) / "work", Path(tmp) / "logs"
                    work.mkdir()
                    logs.mkdir()
                    if driver == "qemu":
                        factory = scenario.qemu_factory(settings, ctl, logs)
                    else:
                        assert daemon is not None
                        factory = scenario.libvirt_factory(
                            daemon, ctl, logs, f"snapimg-bench-{os.getpid()}"
                        )
                    outcome = asyncio.run(
                        scenario.writer_and_backup_vm(settings, factory, ctl, work, logs)
                    )
                rows.append(
                    {
                        "scenario": "snapimg-snapshot",
                        "driver": driver,
                        "controller": name,
                        "problems": outcome.problems,
                        **{k: outcome.facts.get(k) for k in KEYS},
                    }
                )
        if daemon is not None:
            with tempfile.TemporaryDirectory(prefix="bench-linux-") as tmp:
                work, logs = Path(tmp) / "work", Path(tmp) / "logs"
                work.mkdir()
                logs.mkdir()
                outcome = asyncio.run(
                    scenario.libvirt_pull_backup(
                        settings,
                        daemon,
                        controllers.get("lsi"),
                        work,
                        logs,
                        f"snapimg-bench-{os.getpid()}",
                    )
                )
            rows.append(
                {
                    "scenario": "libvirt-pull-backup",
                    "driver": "libvirt",
                    "controller": "lsi",
                    "problems": outcome.problems,
                    **{k: outcome.facts.get(k) for k in KEYS},
                }
            )
    finally:
        if daemon is not None:
            daemon.stop()
    if args.json:
        print(
            json.dumps(
                {"accel": settings.accel, "origin_mib": scenario.ORIGIN_MIB, "rows": rows}, indent=2
            )
        )
    else:
        print(f"{'scenario':20} {'driver':8} {'ctl':4} " + " ".join(f"{k:>12.12}" for k in KEYS))
        for row in rows:
            print(
                f"{row['scenario']:20} {row['driver']:8} {row['controller']:4} "
                + " ".join(f"{row[k]!s:>12.12}" for k in KEYS)
            )
    return 1 if any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
