"""Benchmark of the frozen window of a quiesced snapshot: freeze request to thaw answer, in ms.

A writer VM (the Linux test guest, TCG unless SNAPIMG_ACCEL) rewrites fsynced files on an ext4
origin served by ``snapimg serve`` while ``--count`` quiesced snapshots are taken, one at a time
(each dropped before the next):

* ``snapimg-qga``: ``snapimg snapshot create --quiesce --qga SOCKET`` on a QEMU VM; then as
  many through the same library calls in-process, for the ``breakdown`` of the window into
  the freeze (the guest writes back its dirty data first), the snapshot and the thaw;
* ``snapimg-libvirt``: ``snapimg snapshot create --quiesce --libvirt DOMAIN`` on a libvirt
  domain (virDomainFSFreeze, snapimg's snapshot, virDomainFSThaw);
* ``libvirt-external-snapshot``: libvirt's own quiesced snapshot on the same domain,
  ``virDomainSnapshotCreateXML(DISK_ONLY | QUIESCE | NO_METADATA)`` with a qcow2 overlay per
  snapshot.  Its frozen window is read from libvirtd's debug log (agent commands, with
  millisecond timestamps: freeze sent to thaw answered, the same definition as snapimg's
  ``frozen_ms``), switched on through virt-admin for the run and restored afterwards.

For snapimg the window is the ``frozen_ms`` that ``snapshot list --json`` records; ``call_ms``
is the whole command (process start to exit) or API call.

    python bench/quiesce.py [--count 20] [--controller lsi] [--drivers qemu,libvirt] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vmtests import config, controllers
from vmtests.libvirt_driver import Libvirtd, LibvirtVm
from vmtests.scenarios import linux_backup_vm as linux
from vmtests.scenarios import quiesced_snapshot as scenario
from vmtests.server import SnapimgServer

LOG_FILTERS = "1:qemu.qemu_agent"
SEND = re.compile(r"^(\S+ \S+): .*Send command '\{\"execute\":\"guest-fsfreeze-(freeze|thaw)\"")
LINE = re.compile(r"^(\S+ \S+): .*Line \[(.*)\]")


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


def _row(
    name: str, driver: str, frozen: list[float], calls: list[float], **extra: Any
) -> dict[str, Any]:
    return {
        "path": name,
        "driver": driver,
        "count": len(frozen),
        "frozen_ms": _summary(frozen),
        "call_ms": _summary(calls),
        "frozen_ms_all": frozen,
        **extra,
    }


async def snapimg_series(
    server: SnapimgServer, writer: linux.LinuxGuest, options: list[str], count: int
) -> tuple[list[float], list[float]]:
    frozen, calls = [], []
    for i in range(count):
        began = time.monotonic()
        await server.snapshot_create("origin", f"b{i}", options=["--quiesce", *options])
        calls.append((time.monotonic() - began) * 1000)
        [row] = [r for r in await server.snapshot_list() if r["name"] == f"origin@b{i}"]
        frozen.append(float(row["frozen_ms"]))
        await server.snapshot_drop("origin", f"b{i}")
        await linux.wait_progress(writer, await linux.progress(writer) + 1)
    return frozen, calls


def _library_once(server: SnapimgServer, options: list[str], snap: str) -> dict[str, Any]:
    """One quiesced snapshot through the library calls the CLI makes, for the breakdown."""
    from snapimg.control.client import ControlClient
    from snapimg.qga.quiesce import quiesced

    flag, target = options
    client = ControlClient(server.control)
    with quiesced(
        Path(target) if flag == "--qga" else None, target if flag == "--libvirt" else None
    ) as window:
        client.create_snapshot("origin", snap, max_size=None, writable=False, on_full="invalidate")
    client.drop_snapshot("origin", snap)
    return window.to_json()


async def breakdown_series(
    server: SnapimgServer, writer: linux.LinuxGuest, options: list[str], count: int
) -> dict[str, Any]:
    """Median and max of each part of the window: the freeze (the guest syncs its dirty data
    first), the snapshot, the thaw."""
    parts: dict[str, list[float]] = {"freeze_ms": [], "snapshot_ms": [], "thaw_ms": []}
    for i in range(count):
        window = await asyncio.to_thread(_library_once, server, options, f"l{i}")
        for key, values in parts.items():
            values.append(window[key])
        await linux.wait_progress(writer, await linux.progress(writer) + 1)
    return {key: _summary(values) for key, values in parts.items()}


def _virt_admin(*args: str) -> str:
    proc = subprocess.run(["virt-admin", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"virt-admin {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _current(kind: str) -> str:
    """The daemon's current log filters or outputs (as virt-admin prints them)."""
    text = _virt_admin(f"daemon-log-{kind}")
    return text.split(":", 1)[1].strip() if ":" in text else ""


def _ms(stamp: str) -> float:
    return datetime.strptime(stamp[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000


def frozen_windows(log: str) -> list[float]:
    """freeze sent -> first line answered after the thaw was sent, per snapshot, from
    libvirtd's debug log of the agent."""
    windows, freeze_at, thaw_sent = [], None, False
    for line in log.splitlines():
        if match := SEND.match(line):
            if match[2] == "freeze":
                freeze_at, thaw_sent = _ms(match[1]), False
            else:
                thaw_sent = True
        elif (
            (match := LINE.match(line))
            and thaw_sent
            and freeze_at is not None
            and '"return"' in match[2]
        ):
            windows.append(round(_ms(match[1]) - freeze_at, 1))
            freeze_at, thaw_sent = None, False
    return windows


async def libvirt_series(
    vm: LibvirtVm, workdir: Path, writer: linux.LinuxGuest, count: int
) -> tuple[list[float], list[float], list[str]]:
    import libvirt

    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    )
    log = workdir / "libvirtd-agent.log"
    saved = {kind: _current(kind) for kind in ("filters", "outputs")}
    _virt_admin("daemon-log-outputs", f"1:file:{log} {saved['outputs']}".strip())
    _virt_admin("daemon-log-filters", LOG_FILTERS)
    calls, problems = [], []
    try:
        for i in range(count):
            xml = (
                f"<domainsnapshot><name>lv{i}</name><disks><disk name='{vm.disk_target}' "
                f"snapshot='external' type='file'><source file='{workdir}/lv{i}.qcow2'/>"
                f"</disk></disks></domainsnapshot>"
            )
            began = time.monotonic()
            try:
                await asyncio.to_thread(vm.domain.snapshotCreateXML, xml, flags)
            except libvirt.libvirtError as err:
                problems.append(f"snapshot {i}: {err.get_error_message()}")
                break
            calls.append((time.monotonic() - began) * 1000)
            await linux.wait_progress(writer, await linux.progress(writer) + 1)
    finally:
        _virt_admin("daemon-log-filters", saved["filters"] or "")
        _virt_admin("daemon-log-outputs", saved["outputs"])
    windows = frozen_windows(log.read_text(errors="replace")) if log.exists() else []
    if len(windows) != len(calls):
        problems.append(
            f"{len(windows)} frozen windows in libvirtd's log for {len(calls)} snapshots"
        )
    return windows, calls, problems


async def run_driver(
    settings: config.Settings,
    driver: str,
    ctl: controllers.Controller,
    daemon: Libvirtd | None,
    count: int,
    workdir: Path,
    logs: Path,
) -> list[dict[str, Any]]:
    origin = workdir / "origin.img"
    linux.make_origin(origin)
    outcome = linux.Outcome()
    if driver == "qemu":
        factory = linux.qemu_factory(settings, ctl, logs)
    else:
        assert daemon is not None
        factory = linux.libvirt_factory(daemon, ctl, logs, f"snapimg-bench-{os.getpid()}")
    rows = []
    async with (
        SnapimgServer(settings, {"origin": origin}, logs) as server,
        scenario.running_writer(
            server, factory, ctl, settings, workdir, logs, outcome, linux.OPS_BEFORE_SNAPSHOT
        ) as (writer, agent),
    ):
        frozen, calls = await snapimg_series(server, writer, agent.options, count)
        parts = await breakdown_series(server, writer, agent.options, count)
        rows.append(
            _row(f"snapimg-{agent.options[0].lstrip('-')}", driver, frozen, calls, breakdown=parts)
        )
        if isinstance(writer.vm, LibvirtVm):
            frozen, calls, problems = await libvirt_series(writer.vm, workdir, writer, count)
            rows.append(_row("libvirt-external-snapshot", driver, frozen, calls, problems=problems))
        await linux.stop_writer(writer)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--controller", default="lsi")
    parser.add_argument("--drivers", default="qemu,libvirt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = config.load()
    drivers = [d for d in args.drivers.split(",") if d]
    daemon = Libvirtd.ensure() if "libvirt" in drivers else None
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        for driver in drivers:
            with tempfile.TemporaryDirectory(prefix="bench-quiesce-") as tmp:
                work, logs = Path(tmp) / "work", Path(tmp) / "logs"
                work.mkdir()
                logs.mkdir()
                rows += asyncio.run(
                    run_driver(
                        settings,
                        driver,
                        controllers.get(args.controller),
                        daemon,
                        args.count,
                        work,
                        logs,
                    )
                )
    finally:
        if daemon is not None:
            daemon.stop()
    result = {
        "accel": settings.accel,
        "controller": args.controller,
        "count": args.count,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{'path':28} {'driver':8} {'n':>3} {'frozen med':>10} {'frozen max':>10} "
        f"{'call med':>9} {'call max':>9}"
    )
    for row in rows:
        f, c = row["frozen_ms"], row["call_ms"]
        print(
            f"{row['path']:28} {row['driver']:8} {row['count']:>3} {f['median']!s:>10} "
            f"{f['max']!s:>10} {c['median']!s:>9} {c['max']!s:>9}"
        )
        for part, values in row.get("breakdown", {}).items():
            print(f"  {part:26} median {values['median']}, max {values['max']}")
        for problem in row.get("problems", []):
            print(f"  problem: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
