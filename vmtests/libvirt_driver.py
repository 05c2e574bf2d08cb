"""libvirt as a second way to run the rig's Linux guests, and libvirt's own backup API.

:class:`Libvirtd` reaches the system daemon (``qemu:///system``), or, when none runs, prepares
the host the way a bare Debian machine needs it (a ``libvirt-qemu`` user and group,
``/var/log/libvirt``, an ``/etc/libvirt/qemu.conf`` running QEMU as root with file stdio and no
security driver or cgroups) and starts ``libvirtd --daemon`` itself; :meth:`Libvirtd.stop` ends
only a daemon the rig started.  :func:`domain_xml` describes a guest booting the Linux test
kernel directly, with one disk (an NBD export on a unix socket, or a raw file) on an IDE, AHCI
or SCSI controller, its serial console written to a file, user networking forwarding a
127.0.0.1 port to the guest's SSH, and the qemu-guest-agent channel (libvirt connects to it:
quiesce such a domain through libvirt, ``--libvirt DOMAIN``).  :class:`LibvirtVm` is a
:class:`vmtests.guests.linux.GuestVm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt

from vmtests.controllers import Controller
from vmtests.errors import VmError
from vmtests.guests.linux import BootFiles

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_TEXT = """\
# Written by the snapimg VM rig (vmtests/libvirt_driver.py) for a machine without systemd.
# QEMU runs as root so that it may open unix-socket NBD exports and files anywhere.
user = "root"
group = "root"
# log QEMU's output to files without virtlogd
stdio_handler = "file"
security_driver = "none"
cgroup_controllers = [ ]
"""
PID_FILE = Path("/run/snapimg-vmtests-libvirtd.pid")
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
# Where libvirt's QEMU log (command line, errors) of a domain ends up with stdio_handler=file.
DOMAIN_LOG_DIR = Path("/var/log/libvirt/qemu")


@dataclass(frozen=True)
class NbdDisk:
    """An NBD export on a unix socket."""

    socket: Path
    export: str


@dataclass(frozen=True)
class FileDisk:
    """A raw image file."""

    path: Path


Disk = NbdDisk | FileDisk


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; the rig raises them instead."""


libvirt.registerErrorHandler(_silence, None)


def _ensure_account() -> None:
    """libvirtd looks up ``libvirt-qemu`` even when qemu.conf says root: create it if absent."""
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True, capture_output=True)
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "-g",
                "libvirt-qemu",
                "-d",
                "/var/lib/libvirt",
                "-s",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ],
            check=True,
            capture_output=True,
        )


def _prepare_host() -> None:
    if shutil.which("libvirtd") is None:
        raise VmError("libvirtd is not installed (scripts/install.sh installs libvirt-daemon)")
    _ensure_account()
    for folder in ("/var/log/libvirt", "/var/lib/libvirt", "/run/libvirt"):
        os.makedirs(folder, exist_ok=True)
    if not QEMU_CONF.exists():
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(QEMU_CONF_TEXT)
    elif 'user = "root"' not in QEMU_CONF.read_text():
        raise VmError(
            f"{QEMU_CONF} exists without 'user = \"root\"': the rig needs the lines "
            "of vmtests/libvirt_driver.QEMU_CONF_TEXT (see docs/linux-guest.md)"
        )


def _try_open() -> Any:
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError:
        return None


class Libvirtd:
    """A connection to the system libvirtd; the daemon is started if it is not running."""

    def __init__(self, conn: Any, started_pid: int | None) -> None:
        self.conn = conn
        self.started_pid = started_pid

    @classmethod
    def ensure(cls, timeout: float = 90.0) -> Libvirtd:
        conn = _try_open()
        if conn is not None:
            return cls(conn, None)
        _prepare_host()
        proc = subprocess.run(
            ["libvirtd", "--daemon", "--pid-file", str(PID_FILE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise VmError(f"libvirtd --daemon failed: {proc.stderr.strip()[-300:]}")
        deadline = time.monotonic() + timeout
        while (conn := _try_open()) is None:
            if time.monotonic() > deadline:
                raise VmError(f"libvirtd started but {URI} did not answer within {timeout:g}s")
            time.sleep(0.2)
        return cls(conn, int(PID_FILE.read_text().split()[0]))

    def stop(self, timeout: float = 30.0) -> None:
        """Close the connection; end the daemon only if this rig started it."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        pid = self.started_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started_pid = None


def _disk_target(controller: Controller) -> tuple[str, str, str]:
    """(target dev, bus, controller XML) for a controller name of vmtests.controllers."""
    models = {"lsi": "lsilogic", "megasas": "lsisas1078", "virtio-scsi": "virtio-scsi"}
    if controller.kind == "ide":
        return "hda", "ide", ""
    if controller.kind == "ahci":
        return "sda", "sata", ""
    model = models.get(controller.name)
    if model is None:
        raise VmError(f"libvirt driver: no libvirt model for controller {controller.name!r}")
    return "sda", "scsi", f"<controller type='scsi' index='0' model='{model}'/>"


def _disk_xml(disk: Disk, target: str, bus: str) -> str:
    if isinstance(disk, NbdDisk):
        source = (
            f"<source protocol='nbd' name={quoteattr(disk.export)}>"
            f"<host transport='unix' socket={quoteattr(str(disk.socket))}/></source>"
        )
        kind = "network"
    else:
        source = f"<source file={quoteattr(str(disk.path))}/>"
        kind = "file"
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"{source}<target dev='{target}' bus='{bus}'/></disk>"
    )


def domain_xml(
    name: str,
    controller: Controller,
    disk: Disk,
    boot: BootFiles,
    console_log: Path,
    memory_mb: int,
) -> str:
    target, bus, controller_xml = _disk_target(controller)
    qemu_args = ["-netdev", boot.netdev(), "-device", "virtio-net-pci,netdev=net0,addr=0x1e"]
    args_xml = "".join(f"<qemu:arg value={quoteattr(arg)}/>" for arg in qemu_args)
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{controller.machine_type}'>hvm</type>
    <kernel>{escape(str(boot.kernel))}</kernel>
    <initrd>{escape(str(boot.initrd))}</initrd>
    <cmdline>{escape(boot.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BINARY}</emulator>
    {controller_xml}
    {_disk_xml(disk, target, bus)}
    <serial type='file'><source path={quoteattr(str(console_log))}/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <channel type='unix'><source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{args_xml}</qemu:commandline>
</domain>
"""


class LibvirtVm:
    """A persistent libvirt domain defined from :func:`domain_xml`; undefined on close."""

    def __init__(
        self,
        daemon: Libvirtd,
        name: str,
        controller: Controller,
        disk: Disk,
        boot: BootFiles,
        log_dir: Path,
        memory_mb: int,
    ) -> None:
        self.name = name
        self.conn = daemon.conn
        self.log_dir = log_dir
        self.console_log = log_dir / f"{name}-console.log"
        self.disk_target = _disk_target(controller)[0]
        self.xml = domain_xml(name, controller, disk, boot, self.console_log, memory_mb)
        self.domain: Any = None

    async def start(self) -> None:
        (self.log_dir / f"{self.name}-domain.xml").write_text(self.xml)
        try:
            old = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            old = None
        if old is not None:  # left over from a killed run: same name, never ours to keep
            with contextlib.suppress(libvirt.libvirtError):
                old.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                old.undefine()

        def define_and_start() -> Any:
            domain = self.conn.defineXML(self.xml)
            domain.create()
            return domain

        try:
            self.domain = await asyncio.to_thread(define_and_start)
        except libvirt.libvirtError as err:
            self._copy_qemu_log()
            raise VmError(f"{self.name}: libvirt could not start the domain: {err}") from err

    async def failure(self) -> str | None:
        try:
            if not self.domain.isActive():
                return "the libvirt domain is no longer running"
            state, reason = self.domain.state()
        except libvirt.libvirtError as err:
            return f"libvirt: {err}"
        if state in (
            libvirt.VIR_DOMAIN_PAUSED,
            libvirt.VIR_DOMAIN_CRASHED,
            libvirt.VIR_DOMAIN_SHUTOFF,
        ):
            return f"libvirt domain state {state} (reason {reason})"
        return None

    def _copy_qemu_log(self) -> None:
        source = DOMAIN_LOG_DIR / f"{self.name}.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(source, self.log_dir / f"{self.name}-qemu.log")

    async def close(self) -> None:
        domain, self.domain = self.domain, None
        if domain is not None:

            def stop() -> None:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    domain.undefine()

            await asyncio.to_thread(stop)
        self._copy_qemu_log()


def backup_xml(socket: Path, disk_target: str, scratch: Path) -> str:
    """A pull-mode backup of one disk, exported as ``disk_target`` on a unix socket."""
    return (
        f"<domainbackup mode='pull'><server transport='unix' socket={quoteattr(str(socket))}/>"
        f"<disks><disk name='{disk_target}' backup='yes' type='file'>"
        f"<scratch file={quoteattr(str(scratch))}/></disk></disks></domainbackup>"
    )
