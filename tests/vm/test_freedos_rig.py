"""The rig itself on real FreeDOS guests (plain image files, no snapimg): failure patterns,
timeouts, QMP control, the writer's refusal to touch a disk without the marker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmtests import config, controllers
from vmtests.errors import VmError
from vmtests.guests import freedos
from vmtests.machine import DiskSpec, Machine

pytestmark = pytest.mark.vm


def _machine(
    settings: config.Settings,
    log_dir: Path,
    work: Path,
    disk: Path,
    job: list[str],
    controller: str = "ide",
) -> Machine:
    artifacts = freedos.build(settings)
    return Machine(
        name="guest",
        settings=settings,
        log_dir=log_dir,
        controller=controllers.get(controller),
        disks=[DiskSpec.raw_file("d0", disk)],
        serial_ports=freedos.SERIAL_PORTS,
        extra_args=freedos.guest_args(work),
        floppy=freedos.make_floppy(artifacts, work / "floppy.img", job),
    )


@pytest.mark.parametrize("controller", ["ide", "megasas"])
def test_writer_refuses_a_disk_without_marker(
    controller: str, vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(16 * 63 * 512 * 20))  # whole cylinders, no MBR, no marker
    machine = _machine(
        vm_settings, vm_log_dir, tmp_path, blank, [freedos.writer_job(1, 2, 64, 4)], controller
    )

    async def go() -> str:
        try:
            await machine.start()
            with pytest.raises(VmError) as err:
                await machine.console.expect(
                    [freedos.WRITER_DONE], [freedos.WRITER_FAILED], timeout=60, phase="workload"
                )
            return str(err.value)
        finally:
            await machine.close()

    message = asyncio.run(go())
    assert "WRITER ERROR no disk with the SNAPIMG-TESTDISK marker" in message
    assert blank.read_bytes() == bytes(16 * 63 * 512 * 20)


def test_qmp_control_and_console_timeout(
    vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(freedos.build(vm_settings).test_disk.read_bytes())
    machine = _machine(vm_settings, vm_log_dir, tmp_path, disk, ["ECHO WAITING> AUX"])

    async def go() -> tuple[str, str, str]:
        try:
            await machine.start()
            await machine.console.expect([freedos.BOOTED], timeout=60, phase="boot")
            await machine.console.expect([r"^WAITING"], timeout=60, phase="job")
            await machine.execute("stop")
            paused = (await machine.execute("query-status"))["status"]
            await machine.execute("cont")
            running = (await machine.execute("query-status"))["status"]
            with pytest.raises(VmError) as err:
                await machine.console.expect([r"^NEVER PRINTED"], timeout=1, phase="idle")
            return paused, running, str(err.value)
        finally:
            await machine.close()

    paused, running, message = asyncio.run(go())
    assert (paused, running) == ("paused", "running")
    assert "idle: timed out after 1s" in message
    assert machine.process is not None and machine.process.returncode is not None


def test_qemu_failing_at_start_is_reported(
    vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * 63 * 512))
    machine = _machine(vm_settings, vm_log_dir, tmp_path, disk, ["ECHO HI> AUX"])
    machine.extra_args = ["-device", "no-such-device"]

    async def go() -> None:
        try:
            await machine.start(timeout=30)
        finally:
            await machine.close()

    with pytest.raises(VmError, match="QEMU exited with status 1 at start: .*no-such-device"):
        asyncio.run(go())
