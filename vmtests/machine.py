"""One qemu-system-x86_64 guest, controlled over QMP with qemu.qmp's asyncio QMPClient.

A :class:`Machine` takes a :class:`~vmtests.controllers.Controller`, the disks to put on it
(:class:`DiskSpec`: any ``-blockdev`` tree, e.g. an NBD export), the names of its serial
ports and any extra QEMU arguments a guest needs.  Serial ports are QEMU socket chardevs
(``server=on,wait=on``: QEMU waits until the rig listens, so no early line is lost) read by a
:class:`~vmtests.console.Console`; QEMU's own output goes to ``<name>-qemu.log`` next to the
serial logs.  QEMU runs in its own process group, which :meth:`Machine.close` kills if a
polite ``quit`` does not end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from snapimg.backends.qsd.qmp import execute as qmp_execute
from snapimg.errors import QemuError
from vmtests.config import Settings
from vmtests.console import Console
from vmtests.controllers import Controller
from vmtests.errors import VmError

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class DiskSpec:
    """A hard disk: ``blockdev`` is the -blockdev tree below the device (without node-name)."""

    node: str
    blockdev: dict[str, Any]
    read_only: bool = False

    @classmethod
    def nbd_unix(cls, node: str, socket: Path, export: str, read_only: bool = False) -> DiskSpec:
        tree = {"driver": "nbd", "server": {"type": "unix", "path": str(socket)}, "export": export}
        return cls(node, tree, read_only)

    @classmethod
    def raw_file(cls, node: str, path: Path, read_only: bool = False) -> DiskSpec:
        tree = {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}
        return cls(node, tree, read_only)


@dataclass
class Machine:
    name: str
    settings: Settings
    log_dir: Path
    controller: Controller
    disks: Sequence[DiskSpec]
    serial_ports: Sequence[str] = ("com1",)
    extra_args: Sequence[str] = ()
    memory_mb: int = 32
    floppy: Path | None = None
    qmp: QMPClient = field(init=False)
    console: Console = field(init=False)
    process: asyncio.subprocess.Process | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.qmp = QMPClient(self.name)
        self.console = Console(self.log_dir, self.name, self.settings.timeout_scale)
        self._run_dir = Path(tempfile.mkdtemp(prefix="snapimg-vm-"))  # short socket paths

    # ---- command line -------------------------------------------------------------------

    def _blockdev_args(self) -> list[str]:
        args: list[str] = []
        for disk in self.disks:
            tree = dict(disk.blockdev)
            if disk.read_only and not self.controller.supports_read_only:
                base = f"{disk.node}-base"
                args += ["-blockdev", json.dumps({**tree, "node-name": base, "read-only": True})]
                overlay = self._make_overlay(disk)
                args += [
                    "-blockdev",
                    json.dumps(
                        {
                            "driver": "qcow2",
                            "node-name": disk.node,
                            "backing": base,
                            "file": {"driver": "file", "filename": str(overlay)},
                        }
                    ),
                ]
            else:
                tree.update({"node-name": disk.node, "read-only": disk.read_only})
                args += ["-blockdev", json.dumps(tree)]
        return args

    def _make_overlay(self, disk: DiskSpec) -> Path:
        """A qcow2 overlay so a read-only disk can sit on IDE; guest writes stay in it."""
        overlay = self._run_dir / f"{disk.node}-overlay.qcow2"
        tree = (
            disk.blockdev
            if disk.blockdev["driver"] == "raw"
            else {"driver": "raw", "file": disk.blockdev}
        )
        backing = "json:" + json.dumps({**tree, "read-only": True})
        result = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, str(overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise QemuError(f"qemu-img create overlay for {disk.node}: {result.stderr.strip()}")
        return overlay

    def command(self) -> list[str]:
        ctl = self.controller
        args = [
            QEMU,
            "-machine",
            ctl.machine_type,
            *self.settings.accel_args(),
            "-m",
            str(self.memory_mb),
            "-display",
            "none",
            "-no-user-config",
            "-nodefaults",
            "-name",
            self.name,
            "-chardev",
            f"socket,id=qmp,path={self._run_dir / 'qmp'},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
        for port in self.serial_ports:
            path = self._run_dir / port
            args += [
                "-chardev",
                f"socket,id={port},path={path},server=on,wait=on",
                "-serial",
                f"chardev:{port}",
            ]
        if self.floppy is not None:
            args += [
                "-drive",
                f"if=floppy,format=raw,file={self.floppy}",
                "-global",
                "isa-fdc.bootindexA=0",
            ]
        args += ctl.machine_args() + self._blockdev_args()
        for index, disk in enumerate(self.disks):
            args += ["-device", ctl.disk_device(index, disk.node, bootindex=index + 1)]
        return args + list(self.extra_args)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        timeout *= self.settings.timeout_scale
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log = self.log_dir / f"{self.name}-qemu.log"
        with log.open("w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            self.process = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        try:
            attach = asyncio.ensure_future(self._attach(timeout))
            died = asyncio.ensure_future(self.process.wait())
            await asyncio.wait({attach, died}, return_when=asyncio.FIRST_COMPLETED)
            if attach.done() and attach.exception() is None:
                died.cancel()
                return
            if attach.done():  # attach failed: because QEMU died (either may notice first)?
                await asyncio.wait({died}, timeout=2)
                if not died.done():
                    died.cancel()
                    attach.result()  # QEMU runs: attach's own error
            else:
                attach.cancel()
                with contextlib.suppress(BaseException):
                    await attach
            lines = log.read_text(errors="replace").splitlines()[1:]
            raise VmError(
                f"{self.name}: QEMU exited with status {self.process.returncode} "
                f"at start: {lines[-1] if lines else 'no message'}"
            )
        except BaseException:
            await self.close()
            raise

    async def _attach(self, timeout: float) -> None:
        for port in self.serial_ports:  # QEMU creates (and waits on) them in this order
            await self.console.attach(port, self._run_dir / port, timeout)
        await self._connect_qmp(timeout)

    async def _connect_qmp(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.qmp.connect(str(self._run_dir / "qmp"))
                return
            except (QMPError, OSError) as err:
                if self.process is not None and self.process.returncode is not None:
                    raise VmError(
                        f"{self.name}: QEMU exited with status "
                        f"{self.process.returncode} (see {self.name}-qemu.log)"
                    ) from err
                if loop.time() > deadline:
                    raise VmError(f"{self.name}: no QMP connection within {timeout:g}s") from err
                await asyncio.sleep(0.05)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command; failures become :class:`~snapimg.errors.QemuError` with QEMU's
        error class, description and the command (snapimg's own QMP wrapper)."""
        return await qmp_execute(self.qmp, command, arguments, where=self.name)

    async def wait_exit(self, timeout: float) -> int:
        """Wait until QEMU ends by itself; its exit status."""
        assert self.process is not None
        timeout *= self.settings.timeout_scale
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise VmError(f"{self.name}: QEMU still running after {timeout:g}s") from None

    async def close(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL to its process group) and release everything."""
        proc = self.process
        if proc is not None and proc.returncode is None:
            polite = self.qmp.runstate is not None and self.qmp.runstate.name == "RUNNING"
            if polite:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.qmp.execute("quit"), 5)
            try:
                await asyncio.wait_for(proc.wait(), 5 if polite else 0.01)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        with contextlib.suppress(Exception, EOFError):
            await self.qmp.disconnect()
        await self.console.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    async def __aenter__(self) -> Machine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
