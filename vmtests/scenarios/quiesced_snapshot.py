"""Scenario quiesced-snapshot (issue 13): snapshots of a writing Linux guest, frozen through its
qemu-guest-agent, need no journal replay.

The writer VM (:mod:`vmtests.scenarios.linux_backup_vm`'s manifest workload on an ext4 origin
served by ``snapimg serve``) runs under QEMU (agent socket: ``--qga``) or libvirt (libvirt owns
the agent channel: ``--libvirt DOMAIN``).  While it rewrites fsynced files:

1. **Control.** ``CRASH_SNAPSHOTS`` snapshots without ``--quiesce``, each read on the host
   (``qemu-img convert`` of the export to a file): how many have ext4's ``needs_recovery`` set
   (``dumpe2fs -h``) and what ``e2fsck -fn`` says.  A mounted ext4 keeps the flag set, so these
   show what the quiesced ones must not.
2. **Quiesced.** ``QUIESCED_SNAPSHOTS`` times ``snapimg snapshot create --quiesce``: afterwards
   the agent reports ``thawed`` and the writer completes more operations (it goes on after the
   thaw); read on the host, no ``needs_recovery`` and ``e2fsck -fn`` exits 0 without mentioning
   a journal recovery.  ``snapshot list --json`` records ``quiesced`` and ``frozen_ms``.
3. **Backup and attach.**  ``snapimg backup --quiesce`` (``--control`` with ``--qga`` under
   QEMU, ``--libvirt`` with libvirt's own quiesce under libvirt) and, under QEMU, ``snapimg
   attach --quiesce`` (fleecing in the writer's QEMU, through a second QMP monitor): their
   copies are clean the same way.
4. **Backup VM.**  A second VM boots with the first quiesced snapshot as its disk, makes the
   device read-only in the kernel (``blockdev --setro``: no journal replay is possible), runs
   ``e2fsck -fn`` (must exit 0), mounts it ``-o ro`` (ext4 refuses that when a replay is
   needed) and verifies every file the manifest lists; the snapshot's content is unchanged
   afterwards.

``killed_between_freeze_and_thaw``: ``snapimg snapshot create --quiesce`` whose control socket
takes the create request and never answers (a proxy that forwards everything else to the real
server), so the guest stays frozen; SIGKILL leaves it frozen (the agent says so) until
``snapimg thaw`` recovers it; SIGTERM and SIGINT make snapimg thaw it by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vmtests.config import Settings
from vmtests.controllers import Controller, device_id
from vmtests.errors import VmError
from vmtests.guests import linux_fs
from vmtests.guests.linux import LinuxGuest
from vmtests.libvirt_driver import LibvirtVm, NbdDisk
from vmtests.scenarios.linux_backup_vm import (
    FILES,
    OPS_BEFORE_SNAPSHOT,
    Outcome,
    VmFactory,
    booted,
    check_origin_clean,
    make_origin,
    progress,
    start_writer,
    stop_writer,
    wait_progress,
)
from vmtests.server import SnapimgServer, nbd_copy, nbd_sha256

NAME = "quiesced-snapshot"
CRASH_SNAPSHOTS = 3
QUIESCED_SNAPSHOTS = 3
OPS_BETWEEN = 2  # writer operations completed between two snapshots
AGENT_TIMEOUT = 30.0  # the rig's own status questions to the agent
KILL_WAIT = 120.0  # until the held create request arrives (the guest is frozen)


@dataclass(frozen=True)
class Agent:
    """How snapimg reaches the writer's guest agent, and the agent's freeze state."""

    options: list[str]  # --qga SOCKET | --libvirt DOMAIN
    status: Callable[[], Awaitable[str]]  # "thawed" | "frozen", asked of the agent


def agent_of(guest: LinuxGuest) -> Agent:
    if isinstance(guest.vm, LibvirtVm):
        domain = guest.vm.name

        def ask_libvirt() -> str:
            from snapimg.qga.freezers import LibvirtFreezer

            freezer = LibvirtFreezer(domain)
            try:
                return freezer.agent_status(AGENT_TIMEOUT)
            finally:
                freezer.close()

        return Agent(["--libvirt", domain], lambda: asyncio.to_thread(ask_libvirt))
    socket = guest.boot_files.agent_socket

    def ask_socket() -> str:
        from snapimg.qga.client import AgentClient

        with AgentClient(socket, AGENT_TIMEOUT) as client:
            return client.fsfreeze_status()

    return Agent(["--qga", str(socket)], lambda: asyncio.to_thread(ask_socket))


def second_monitor(workdir: Path) -> Callable[[str], list[str]]:
    """QEMU arguments for a second QMP monitor (the rig holds the first): ``snapimg attach``
    connects there."""

    def args(name: str) -> list[str]:
        return [
            "-chardev",
            f"socket,id=qmp2,path={monitor_path(workdir, name)},server=on,wait=off",
            "-mon",
            "chardev=qmp2,mode=control",
        ]

    return args


def monitor_path(workdir: Path, name: str) -> Path:
    return workdir / f"{name}-qmp2.sock"


# ---- host-side checks of a copy --------------------------------------------------------------


@dataclass(frozen=True)
class ImageCheck:
    needs_recovery: bool
    e2fsck_status: int
    e2fsck_output: str

    @property
    def clean(self) -> bool:
        """No recovery flag, e2fsck -fn exits 0 and says nothing of a journal.  (e2fsck -n
        exits 0 on a filesystem that needs recovery too: it prints "skipping journal recovery"
        and declines to fix the free counts, which are no errors.)"""
        text = self.e2fsck_output.lower()
        return (
            not self.needs_recovery
            and self.e2fsck_status == 0
            and "journal" not in text
            and "recovery" not in text
        )


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


async def check_image(image: Path) -> ImageCheck:
    """``dumpe2fs -h`` (is ``needs_recovery`` among the features?) and ``e2fsck -fn``."""
    dump = await asyncio.to_thread(_run, ["dumpe2fs", "-h", str(image)])
    features = next(
        (line for line in dump.stdout.splitlines() if line.startswith("Filesystem features:")), None
    )
    if features is None:
        raise VmError(f"dumpe2fs -h {image.name} shows no features: {dump.stderr.strip()}")
    fsck = await asyncio.to_thread(_run, ["e2fsck", "-fn", str(image)])
    return ImageCheck(
        "needs_recovery" in features.split(), fsck.returncode, fsck.stdout + fsck.stderr
    )


async def check_export(uri: str, copy: Path) -> ImageCheck:
    await nbd_copy(uri, copy)
    try:
        return await check_image(copy)
    finally:
        copy.unlink()


def _describe(check: ImageCheck) -> str:
    return (
        f"needs_recovery={check.needs_recovery}, e2fsck -fn exit {check.e2fsck_status}: "
        f"{check.e2fsck_output.strip()[-160:]!r}"
    )


# ---- the scenario -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_writer(
    server: SnapimgServer,
    factory: VmFactory,
    controller: Controller,
    settings: Settings,
    workdir: Path,
    log_dir: Path,
    outcome: Outcome,
    ops: int,
) -> AsyncIterator[tuple[LinuxGuest, Agent]]:
    """The writer VM on ``server``'s export ``origin``, its workload ``ops`` operations in."""
    async with booted(
        factory,
        controller,
        "writer",
        NbdDisk(server.socket, "origin"),
        settings,
        workdir,
        log_dir,
        outcome,
    ) as writer:
        await start_writer(writer)
        await wait_progress(writer, ops)
        yield writer, agent_of(writer)


async def quiesced_snapshot(
    settings: Settings, factory: VmFactory, controller: Controller, workdir: Path, log_dir: Path
) -> Outcome:
    outcome = Outcome()
    origin = workdir / "origin.img"
    make_origin(origin)
    async with SnapimgServer(settings, {"origin": origin}, log_dir) as server:
        async with running_writer(
            server, factory, controller, settings, workdir, log_dir, outcome, OPS_BEFORE_SNAPSHOT
        ) as (writer, agent):
            await crash_consistent_control(server, writer, workdir, outcome)
            kept = await quiesced_snapshots(server, writer, agent, workdir, outcome)
            await check_listing(server, outcome)
            await quiesced_backup(server, writer, agent, workdir, outcome)
            if not isinstance(writer.vm, LibvirtVm):
                await quiesced_attach(server, agent, workdir, outcome)
            await stop_writer(writer)
        uri = server.uri("origin@q0")
        snapshot_sha = await nbd_sha256(uri)
        async with booted(
            factory,
            controller,
            "backup",
            NbdDisk(server.socket, "origin@q0"),
            settings,
            workdir,
            log_dir,
            outcome,
        ) as backup:
            await check_read_only_in_backup_vm(backup, snapshot_sha, *kept, outcome)
        outcome.check(
            await nbd_sha256(uri) == snapshot_sha,
            "the backup VM changed the quiesced snapshot (a journal replay?)",
        )
    await check_origin_clean(origin, outcome)
    return outcome


async def crash_consistent_control(
    server: SnapimgServer, writer: LinuxGuest, workdir: Path, outcome: Outcome
) -> None:
    flagged = unclean = 0
    for i in range(CRASH_SNAPSHOTS):
        uri = await server.snapshot_create("origin", f"crash{i}")
        check = await check_export(uri, workdir / f"crash{i}.img")
        flagged += check.needs_recovery
        unclean += not check.clean
        if i:  # crash0 stays for the listing check
            await server.snapshot_drop("origin", f"crash{i}")
        await wait_progress(writer, await progress(writer) + OPS_BETWEEN)
    outcome.facts["crash_needs_recovery"] = f"{flagged}/{CRASH_SNAPSHOTS}"
    outcome.facts["crash_not_clean"] = f"{unclean}/{CRASH_SNAPSHOTS}"
    # a mounted ext4 keeps needs_recovery set: without that the quiesced check proves nothing
    outcome.check(flagged > 0, "no snapshot taken without --quiesce needed a journal recovery")


async def quiesced_snapshots(
    server: SnapimgServer, writer: LinuxGuest, agent: Agent, workdir: Path, outcome: Outcome
) -> tuple[int, int]:
    """Take them; (ops before, ops after) the first one, which is kept for the backup VM."""
    flagged = 0
    kept = (0, 0)
    for i in range(QUIESCED_SNAPSHOTS):
        before = await progress(writer)
        # writable: only so that the backup VM's disk can sit on IDE and libvirt; the backup
        # VM makes the device read-only in its kernel before touching it
        uri = await server.snapshot_create(
            "origin", f"q{i}", writable=True, options=["--quiesce", *agent.options]
        )
        after = await progress(writer)
        status = await agent.status()
        outcome.check(status == "thawed", f"q{i}: the agent reports {status!r} after snapimg")
        await wait_progress(writer, after + OPS_BETWEEN)  # the writer goes on after the thaw
        check = await check_export(uri, workdir / f"q{i}.img")
        flagged += check.needs_recovery
        outcome.check(check.clean, f"quiesced snapshot q{i} is not clean: {_describe(check)}")
        if i == 0:
            kept = (before, after)
        else:
            await server.snapshot_drop("origin", f"q{i}")
    outcome.facts["quiesced_needs_recovery"] = f"{flagged}/{QUIESCED_SNAPSHOTS}"
    return kept


async def check_listing(server: SnapimgServer, outcome: Outcome) -> None:
    rows = {row["name"]: row for row in await server.snapshot_list()}
    quiesced, crash = rows.get("origin@q0", {}), rows.get("origin@crash0", {})
    outcome.facts["q0_frozen_ms"] = quiesced.get("frozen_ms")
    outcome.check(
        quiesced.get("quiesced") is True
        and isinstance(quiesced.get("frozen_ms"), int)
        and quiesced["frozen_ms"] > 0,
        f"snapshot list --json for origin@q0: {quiesced}",
    )
    outcome.check(
        crash.get("quiesced") is False and crash.get("frozen_ms") is None and "frozen_ms" in crash,
        f"snapshot list --json for origin@crash0: {crash}",
    )
    await server.snapshot_drop("origin", "crash0")


async def quiesced_backup(
    server: SnapimgServer, writer: LinuxGuest, agent: Agent, workdir: Path, outcome: Outcome
) -> None:
    target = workdir / "backups"
    if isinstance(writer.vm, LibvirtVm):  # libvirt's pull backup, quiesced through libvirt
        source = ["--libvirt", writer.vm.name, "--disk", writer.vm.disk_target]
    else:
        source = ["--control", str(server.control), *agent.options]
    summary = json.loads(
        await server.cli("backup", *source, "origin", "--to", str(target), "--quiesce", "--json")
    )
    outcome.facts["backup_frozen_ms"] = summary.get("frozen_ms")
    outcome.check(
        summary.get("quiesced") is True and summary.get("filesystems_frozen") == 1,
        f"snapimg backup --quiesce --json says {summary}",
    )
    # the point is a qcow2 file (docs/backup.md): its raw image, as a user gets it back
    restored = workdir / "restored.img"
    await server.cli("restore", str(target), "--backup", summary["id"], "--to", str(restored))
    try:
        check = await check_image(restored)
    finally:
        restored.unlink()
    outcome.check(check.clean, f"the quiesced backup is not clean: {_describe(check)}")
    status = await agent.status()
    outcome.check(status == "thawed", f"the agent reports {status!r} after the backup")


async def quiesced_attach(
    server: SnapimgServer, agent: Agent, workdir: Path, outcome: Outcome
) -> None:
    qmp = str(monitor_path(workdir, "writer"))
    uri = await server.cli(
        "attach",
        "--qmp",
        qmp,
        "--device",
        device_id("disk0"),
        "--store-dir",
        str(workdir / "attach"),
        "origin@att",
        "--quiesce",
        *agent.options,
    )
    try:
        check = await check_export(uri, workdir / "attach.img")
    finally:
        await server.cli("detach", "--qmp", qmp, "origin@att")
    outcome.check(check.clean, f"the quiesced attach snapshot is not clean: {_describe(check)}")
    outcome.facts["attach_clean"] = check.clean


async def check_read_only_in_backup_vm(
    guest: LinuxGuest, snapshot_sha: str, before: int, after: int, outcome: Outcome
) -> None:
    guest_sha = (await guest.run(linux_fs.HASH_DEVICE, timeout=300)).stdout.strip()
    outcome.check(
        guest_sha == snapshot_sha,
        f"the backup VM reads {guest_sha[:12]}, the host read {snapshot_sha[:12]}",
    )
    fsck = await guest.run(linux_fs.READ_ONLY_FSCK, timeout=300, check=False)
    outcome.facts["backup_vm_e2fsck_n_status"] = fsck.status
    outcome.check(
        fsck.status == 0,
        f"e2fsck -fn on the read-only device exited {fsck.status}: {fsck.stdout[-200:]!r}",
    )
    listing = await guest.run(linux_fs.READ_ONLY_MOUNT_AND_LIST, timeout=300, check=False)
    outcome.check(
        listing.status == 0,
        f"mount -o ro of the read-only device failed "
        f"(exit {listing.status}): {listing.stderr[-200:]!r}",
    )
    if listing.status != 0:
        return
    manifest, files = linux_fs.parse_listing(listing.stdout)
    verdict = linux_fs.verify(manifest, files)
    outcome.facts.update(
        done_ops_in_snapshot=verdict.done_ops,
        files_verified=verdict.files_checked,
        ops_before_snapshot=before,
        ops_after_snapshot=after,
    )
    outcome.problems += verdict.problems
    outcome.check(
        verdict.files_checked == FILES,
        f"the snapshot holds {verdict.files_checked} files, not {FILES}",
    )
    outcome.check(
        before <= verdict.done_ops <= after + 1,
        f"the snapshot holds {verdict.done_ops} operations, not between {before} and {after} + 1",
    )


# ---- killed between freeze and thaw ---------------------------------------------------------


async def quiesce_refused_while_frozen(
    settings: Settings, server: SnapimgServer, agent: Agent, outcome: Outcome
) -> None:
    """A guest frozen by someone else is neither frozen again nor thawed by a quiesce."""
    proc = await asyncio.create_subprocess_exec(
        *settings.snapimg_command(),
        "snapshot",
        "create",
        "--control",
        str(server.control),
        "origin@refused",
        "--quiesce",
        *agent.options,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    outcome.check(
        proc.returncode == 1 and b"frozen already" in err,
        f"a quiesce of a frozen guest: exit {proc.returncode}, {err.decode()!r}",
    )
    status = await agent.status()
    outcome.check(status == "frozen", f"the refused quiesce left the agent {status!r}")


@contextlib.asynccontextmanager
async def holding_control(real: Path, path: Path) -> AsyncIterator[asyncio.Event]:
    """A control socket at ``path`` that forwards requests to ``real`` but takes a
    ``create_snapshot`` request and never answers it; the event is set when one arrives."""
    held = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if json.loads(line).get("method") == "create_snapshot":
                    held.set()
                    await reader.read()  # until the client is gone
                    return
                up_reader, up_writer = await asyncio.open_unix_connection(str(real))
                up_writer.write(line)
                writer.write(await up_reader.readline())
                up_writer.close()
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield held
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def killed_between_freeze_and_thaw(
    settings: Settings, factory: VmFactory, controller: Controller, workdir: Path, log_dir: Path
) -> Outcome:
    outcome = Outcome()
    origin = workdir / "origin.img"
    make_origin(origin)
    async with SnapimgServer(settings, {"origin": origin}, log_dir) as server:
        async with running_writer(
            server, factory, controller, settings, workdir, log_dir, outcome, 3
        ) as (writer, agent):
            for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                await signal_while_frozen(settings, server, writer, agent, sig, workdir, outcome)
            await failures_while_frozen(settings, server, writer, agent, workdir, outcome)
            await stop_writer(writer)
        listing = [row["name"] for row in await server.snapshot_list()]
        outcome.check(
            listing == ["origin@dup"],
            f"snapshots other than origin@dup exist although no create was answered: {listing}",
        )
    return outcome


async def failures_while_frozen(
    settings: Settings,
    server: SnapimgServer,
    writer: LinuxGuest,
    agent: Agent,
    workdir: Path,
    outcome: Outcome,
) -> None:
    """The snapshot fails (a duplicate name) or never comes (the held request with a short
    --quiesce-timeout): snapimg exits 1 with one line and the guest is thawed."""
    await server.snapshot_create("origin", "dup")
    proxy = workdir / "timeout-control.sock"
    async with holding_control(server.control, proxy):
        cases = {
            "duplicate": (server.control, "origin@dup", "exists"),
            "timeout": (proxy, "origin@late", "was not taken within 3 s of the freeze"),
        }
        for case, (control, name, expected) in cases.items():
            proc = await asyncio.create_subprocess_exec(
                *settings.snapimg_command(),
                "snapshot",
                "create",
                "--control",
                str(control),
                name,
                "--quiesce",
                *agent.options,
                "--quiesce-timeout",
                "3",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(), 120)
            lines = err.decode().strip().splitlines()
            outcome.check(
                proc.returncode == 1 and len(lines) == 1 and expected in lines[0],
                f"{case}: exit {proc.returncode}, stderr {err.decode()[-300:]!r}",
            )
            status = await agent.status()
            outcome.check(status == "thawed", f"{case}: the agent reports {status!r}")
            await wait_progress(writer, await progress(writer) + 1)


async def signal_while_frozen(
    settings: Settings,
    server: SnapimgServer,
    writer: LinuxGuest,
    agent: Agent,
    sig: signal.Signals,
    workdir: Path,
    outcome: Outcome,
) -> None:
    name = sig.name.lower()
    proxy = workdir / f"{name}-control.sock"
    async with holding_control(server.control, proxy) as held:
        proc = await asyncio.create_subprocess_exec(
            *settings.snapimg_command(),
            "snapshot",
            "create",
            "--control",
            str(proxy),
            f"origin@{name}",
            "--quiesce",
            *agent.options,
            "--quiesce-timeout",
            "600",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            await asyncio.wait_for(held.wait(), KILL_WAIT)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
            raise VmError(f"snapimg never sent its create request: {err.decode()[-300:]}") from None
        # snapimg sends the request only after the freeze answered: the guest is frozen now
        os.kill(proc.pid, sig)
        _, err = await proc.communicate()
    outcome.facts[f"{name}_exit"] = proc.returncode
    stuck = await progress(writer)
    status = await agent.status()
    if sig == signal.SIGKILL:
        outcome.check(status == "frozen", f"after SIGKILL the agent reports {status!r}")
        await quiesce_refused_while_frozen(settings, server, agent, outcome)
        thawed = await server.cli("thaw", *agent.options)
        outcome.facts["thaw_output"] = thawed
        outcome.check(thawed.startswith("thawed 1 filesystem"), f"snapimg thaw said {thawed!r}")
        status = await agent.status()
    else:
        outcome.check(proc.returncode != 0, f"snapimg exited 0 after {sig.name}")
        outcome.check(
            err.decode().strip().endswith("interrupted"),
            f"snapimg after {sig.name}: {err.decode().strip()[-200:]!r}",
        )
    outcome.check(status == "thawed", f"after {sig.name} (and thaw) the agent reports {status!r}")
    await wait_progress(writer, stuck + OPS_BETWEEN)  # the writer goes on
