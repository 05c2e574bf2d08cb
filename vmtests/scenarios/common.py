"""What every FreeDOS scenario shares: the origin served by snapimg and the guests on it.

A :class:`Rig` holds a scenario's work directory, the built FreeDOS artefacts, the origin
(a fresh copy of the blank test disk) served by ``snapimg serve`` as export ``disk``, and
makes FreeDOS machines whose hard disk is that export.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmtests.config import Settings
from vmtests.controllers import Controller
from vmtests.errors import VmError
from vmtests.guests import freedos
from vmtests.machine import DiskSpec, Machine
from vmtests.server import SnapimgServer

EXPORT = "disk"
BOOT_TIMEOUT = 60.0
ServerFactory = Callable[[Settings, dict[str, Path], Path, str], SnapimgServer]


@dataclass
class Result:
    """What a scenario measured and the problems its checks found (empty: passed)."""

    scenario: str
    controller: str
    problems: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


@dataclass
class Rig:
    settings: Settings
    controller: Controller
    workdir: Path
    log_dir: Path
    artifacts: freedos.Artifacts
    origin: Path
    server: SnapimgServer

    def floppy(self, name: str, job: Sequence[str]) -> Path:
        return freedos.make_floppy(self.artifacts, self.workdir / f"{name}-floppy.img", job)

    def machine(
        self,
        name: str,
        job: Sequence[str],
        disks: Sequence[DiskSpec] | None = None,
        controller: Controller | None = None,
    ) -> Machine:
        """A FreeDOS guest running ``job``; by default its one hard disk is the origin export."""
        if disks is None:
            disks = [DiskSpec.nbd_unix("origin", self.server.socket, EXPORT)]
        return Machine(
            name=name,
            settings=self.settings,
            log_dir=self.log_dir,
            controller=controller or self.controller,
            disks=disks,
            serial_ports=freedos.SERIAL_PORTS,
            extra_args=freedos.guest_args(self.workdir),
            floppy=self.floppy(name, job),
        )


async def boot(machine: Machine) -> float:
    """Start a FreeDOS machine and wait for AUTOEXEC; seconds from launch to the boot line."""
    began = time.monotonic()
    await machine.start()
    await machine.console.expect(
        [freedos.BOOTED],
        timeout=BOOT_TIMEOUT,
        phase="boot",
        watch={"screen": freedos.SCREEN_FAILURES},
    )
    return time.monotonic() - began


async def expect_line(
    machine: Machine, success: str, failure: str, timeout: float, phase: str
) -> str:
    """Wait for a COM1 line of the running job; a DOS error on screen fails it too."""
    match = await machine.console.expect(
        [success],
        [failure, freedos.JOB_ENDED],
        timeout=timeout,
        phase=phase,
        watch={"screen": freedos.SCREEN_FAILURES},
    )
    return match.string


async def finish(machine: Machine, done: str, failure: str, timeout: float) -> None:
    """Wait for the job's last line and for QEMU to exit cleanly through isa-debug-exit."""
    await expect_line(machine, done, failure, timeout, "workload")
    status = await machine.wait_exit(timeout=30)
    if status != freedos.CLEAN_EXIT:
        raise VmError(
            f"{machine.name}: QEMU exit status {status}, "
            f"expected {freedos.CLEAN_EXIT} (clean isa-debug-exit)"
        )


@asynccontextmanager
async def open_rig(
    settings: Settings,
    controller: Controller,
    workdir: Path,
    log_dir: Path,
    backend: str = "native",
    server_factory: ServerFactory = SnapimgServer,
) -> AsyncIterator[Rig]:
    """Build the guest images, copy the blank test disk and serve it with snapimg
    (``snapimg serve --backend BACKEND``)."""
    if reason := settings.accel_unusable():
        raise VmError(reason)
    artifacts = freedos.build(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    origin = workdir / "origin.img"
    shutil.copyfile(artifacts.test_disk, origin)
    server = server_factory(settings, {EXPORT: origin}, log_dir, backend)
    await server.start()
    try:
        yield Rig(settings, controller, workdir, log_dir, artifacts, origin, server)
    finally:
        await server.stop()
