"""Linux scenarios: a writer VM on an origin, a snapshot with no pause, a backup VM that checks it.

``writer_and_backup_vm`` (issue 6, scenarios 1-3): an ext4 origin served by ``snapimg serve``;
a writer VM (Linux, over SSH) runs the manifest workload of :mod:`vmtests.guests.linux_fs`;
``snapimg snapshot create --writable`` is taken while it writes; the host hashes the snapshot
export over NBD while the writer keeps writing; a backup VM boots with the snapshot on the same
controller, hashes the whole device (must equal the host's hash), runs ``e2fsck -fy`` (journal
replay lands in the writable snapshot, never the origin), mounts it and verifies every file the
manifest lists; the origin must come out of this unchanged, and clean for ``e2fsck -fn``.
Both VMs run under QEMU directly or as libvirt domains (``driver``).

``libvirt_pull_backup`` (scenario 4): the same writer on a libvirt VM whose disk is a plain raw
file; libvirt's own backup API (virDomainBackupBegin, pull mode) exports a point-in-time view,
``qemu-img convert`` copies it, and the same backup-VM code verifies the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmtests.config import Settings
from vmtests.controllers import Controller
from vmtests.errors import VmError
from vmtests.guests import linux_fs
from vmtests.guests.linux import MEMORY_MB, BootFiles, GuestVm, LinuxGuest, QemuVm, build_image
from vmtests.libvirt_driver import Disk, FileDisk, Libvirtd, LibvirtVm, NbdDisk, backup_xml
from vmtests.machine import DiskSpec, Machine
from vmtests.server import SnapimgServer, nbd_copy, nbd_sha256

ORIGIN_MIB = 32
FILES = 12  # files the writer creates, then keeps rewriting
OPS_BEFORE_SNAPSHOT = 15  # completed operations before the snapshot is taken
OPS_AFTER_SNAPSHOT = 10  # and after it, so blocks are rewritten under the snapshot
WORK_TIMEOUT = 180.0
MIB = 1 << 20

VmFactory = Callable[[str, Disk, BootFiles], GuestVm]


@dataclass
class Outcome:
    """What a scenario measured and the problems its checks found (empty: passed)."""

    facts: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def make_origin(path: Path, mib: int = ORIGIN_MIB) -> None:
    """A raw image holding an ext4 filesystem (fully initialised: no lazy init in the guest)."""
    with path.open("wb") as handle:
        handle.truncate(mib * MIB)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "origin",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def qemu_factory(
    settings: Settings,
    controller: Controller,
    log_dir: Path,
    extra_args: Callable[[str], list[str]] | None = None,
) -> VmFactory:
    """``extra_args(vm name)``: more QEMU arguments for that VM."""

    def make(name: str, disk: Disk, boot: BootFiles) -> GuestVm:
        if isinstance(disk, NbdDisk):
            spec = DiskSpec.nbd_unix("disk0", disk.socket, disk.export)
        else:
            spec = DiskSpec.raw_file("disk0", disk.path)
        machine = Machine(
            name=name,
            settings=settings,
            log_dir=log_dir,
            controller=controller,
            disks=[spec],
            memory_mb=MEMORY_MB,
            extra_args=boot.qemu_args() + (extra_args(name) if extra_args else []),
        )
        return QemuVm(machine)

    return make


def libvirt_factory(
    daemon: Libvirtd, controller: Controller, log_dir: Path, prefix: str
) -> VmFactory:
    def make(name: str, disk: Disk, boot: BootFiles) -> GuestVm:
        return LibvirtVm(daemon, f"{prefix}-{name}", controller, disk, boot, log_dir, MEMORY_MB)

    return make


@contextlib.asynccontextmanager
async def booted(
    factory: VmFactory,
    controller: Controller,
    name: str,
    disk: Disk,
    settings: Settings,
    workdir: Path,
    log_dir: Path,
    outcome: Outcome,
) -> AsyncIterator[LinuxGuest]:
    image = await asyncio.to_thread(build_image, settings)
    boot = BootFiles.make(image, workdir, name, module_groups=[controller.name, "ext4"])
    guest = LinuxGuest(factory(name, disk, boot), boot, log_dir)
    try:
        outcome.facts[f"{name}_boot_to_ssh_s"] = round(await guest.boot(), 2)
        yield guest
    finally:
        await guest.close()


async def progress(guest: LinuxGuest) -> int:
    text = (await guest.run("cat /tmp/progress", timeout=15)).stdout.strip()
    if not text.isdigit():
        log = (await guest.run("cat /tmp/bg.log", timeout=15, check=False)).stdout
        raise VmError(f"writer is not running (progress {text!r}): {log.strip()[-300:]}")
    return int(text)


async def wait_progress(guest: LinuxGuest, at_least: int) -> int:
    deadline = time.monotonic() + WORK_TIMEOUT
    while (done := await progress(guest)) < at_least:
        if time.monotonic() > deadline:
            raise VmError(f"writer completed {done} operations, not {at_least}, in time")
        await asyncio.sleep(0.5)
    return done


async def start_writer(guest: LinuxGuest) -> None:
    await guest.run("cat >/tmp/writer.sh", stdin=linux_fs.writer_script(FILES).encode(), timeout=15)
    await guest.run(
        "echo 0 >/tmp/progress; setsid sh /tmp/writer.sh >/tmp/bg.log 2>&1 </dev/null &", timeout=15
    )


async def stop_writer(guest: LinuxGuest) -> None:
    """Let the writer finish its operation, unmount, and flush: the origin ends clean."""
    await guest.run(
        "touch /tmp/stop; while grep -q '^[0-9]' /tmp/progress; do sleep 0.1; done; "
        "sync; cat /tmp/progress",
        timeout=60,
    )
    state = await guest.run("cat /tmp/progress /tmp/bg.log", timeout=15)
    if not state.stdout.startswith("stopped"):
        raise VmError(f"writer did not stop cleanly: {state.stdout.strip()[-300:]}")


async def check_in_backup_vm(
    guest: LinuxGuest, host_sha256: str, before: int, after: int, outcome: Outcome
) -> None:
    """Device hash, e2fsck -fy, mount, manifest verification: the backup VM's whole job."""
    began = time.monotonic()
    guest_sha = (await guest.run(linux_fs.HASH_DEVICE, timeout=300)).stdout.strip()
    outcome.facts["guest_hash_mib_s"] = round(ORIGIN_MIB / (time.monotonic() - began), 1)
    outcome.facts["guest_sha256"] = guest_sha
    outcome.check(
        guest_sha == host_sha256,
        f"the backup VM reads {guest_sha[:12]}, the host read {host_sha256[:12]}",
    )
    fsck = await guest.run(linux_fs.FSCK, timeout=300, check=False)
    outcome.facts["e2fsck_status"] = fsck.status
    outcome.check(
        fsck.status & ~3 == 0,
        f"e2fsck -fy left errors (exit {fsck.status}): {fsck.stdout[-200:]!r}",
    )
    listing = await guest.run(linux_fs.MOUNT_AND_LIST, timeout=300)
    manifest, files = linux_fs.parse_listing(listing.stdout)
    verdict = linux_fs.verify(manifest, files)
    outcome.facts.update(
        done_ops_in_snapshot=verdict.done_ops,
        files_verified=verdict.files_checked,
        ops_before_snapshot=before,
        ops_after_snapshot=after,
    )
    outcome.problems += verdict.problems
    outcome.check(verdict.files_checked > 0, "the snapshot holds no file to verify")
    outcome.check(
        verdict.done_ops >= before,
        f"the snapshot lacks operations completed before it ({verdict.done_ops} < {before})",
    )
    outcome.check(
        verdict.done_ops <= after + 1,
        f"the snapshot holds operations started after it ({verdict.done_ops} > {after} + 1)",
    )


async def host_read(uri: str, outcome: Outcome, copy_to: Path | None = None) -> str:
    """sha256 of an export read by the host (and a raw copy if asked), with its throughput."""
    began = time.monotonic()
    if copy_to is None:
        digest = await nbd_sha256(uri)
    else:
        await nbd_copy(uri, copy_to)
        digest = await asyncio.to_thread(_file_sha256, copy_to)
    outcome.facts["host_read_mib_s"] = round(ORIGIN_MIB / (time.monotonic() - began), 1)
    outcome.facts["host_sha256"] = digest
    return digest


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


async def writer_and_backup_vm(
    settings: Settings, factory: VmFactory, controller: Controller, workdir: Path, log_dir: Path
) -> Outcome:
    outcome = Outcome()
    origin = workdir / "origin.img"
    make_origin(origin)
    async with SnapimgServer(settings, {"origin": origin}, log_dir) as server:
        origin_disk = NbdDisk(server.socket, "origin")
        snapshot_disk = NbdDisk(server.socket, "origin@backup")
        async with booted(
            factory, controller, "writer", origin_disk, settings, workdir, log_dir, outcome
        ) as writer:
            outcome.check(
                await writer.refuses_other_host_key(),
                "SSH logged in although the guest's host key was not the pinned one",
            )
            await start_writer(writer)
            before = await wait_progress(writer, OPS_BEFORE_SNAPSHOT)
            # writable: the backup VM's fsck may replay the journal into the snapshot
            uri = await server.snapshot_create("origin", "backup", writable=True)
            after = await progress(writer)
            await wait_progress(writer, after + OPS_AFTER_SNAPSHOT)
            host_sha = await host_read(uri, outcome)  # while the writer keeps writing
            await stop_writer(writer)
        origin_sha = await nbd_sha256(server.uri("origin"))
        async with booted(
            factory, controller, "backup", snapshot_disk, settings, workdir, log_dir, outcome
        ) as backup:
            await check_in_backup_vm(backup, host_sha, before, after, outcome)
        outcome.check(
            await nbd_sha256(server.uri("origin")) == origin_sha,
            "the backup VM's fsck and mount changed the origin",
        )
    await check_origin_clean(origin, outcome)
    return outcome


async def check_origin_clean(origin: Path, outcome: Outcome) -> None:
    """The writer unmounted: the origin's ext4 must be clean for a read-only e2fsck."""
    proc = await asyncio.to_thread(
        subprocess.run, ["e2fsck", "-fn", str(origin)], capture_output=True, text=True, timeout=120
    )
    outcome.facts["origin_e2fsck_status"] = proc.returncode
    outcome.check(
        proc.returncode == 0,
        f"e2fsck -fn of the origin exited {proc.returncode}: {proc.stdout[-200:]!r}",
    )


async def libvirt_pull_backup(
    settings: Settings,
    daemon: Libvirtd,
    controller: Controller,
    workdir: Path,
    log_dir: Path,
    prefix: str,
) -> Outcome:
    outcome = Outcome()
    origin = workdir / "origin.img"
    make_origin(origin)
    factory = libvirt_factory(daemon, controller, log_dir, prefix)
    socket = workdir / "backup.sock"
    copy = workdir / "backup-copy.img"
    async with booted(
        factory, controller, "writer", FileDisk(origin), settings, workdir, log_dir, outcome
    ) as writer:
        assert isinstance(writer.vm, LibvirtVm)
        await start_writer(writer)
        before = await wait_progress(writer, OPS_BEFORE_SNAPSHOT)
        domain = writer.vm.domain
        xml = backup_xml(socket, writer.vm.disk_target, workdir / "scratch.qcow2")
        await asyncio.to_thread(domain.backupBegin, xml, None, 0)
        try:
            after = await progress(writer)
            await wait_progress(writer, after + OPS_AFTER_SNAPSHOT)
            uri = f"nbd+unix:///{writer.vm.disk_target}?socket={socket}"
            host_sha = await host_read(uri, outcome, copy_to=copy)
            stats = await asyncio.to_thread(domain.jobStats)
            outcome.facts["libvirt_scratch_bytes"] = stats.get("disk_temp_used")
        finally:
            await asyncio.to_thread(domain.abortJob)
        await stop_writer(writer)
    await check_origin_clean(origin, outcome)
    async with booted(
        factory, controller, "backup", FileDisk(copy), settings, workdir, log_dir, outcome
    ) as backup:
        await check_in_backup_vm(backup, host_sha, before, after, outcome)
    return outcome
