"""The Linux test guest: its image, per-run keys, and a booted guest reached over SSH.

The image (kernel + initramfs) comes from images/linux/build.py, cached under
``SNAPIMG_CACHE_DIR/linux``.  Each boot gets a fresh host key and client key, appended to the
cached initramfs as a second cpio archive, and a free 127.0.0.1 port forwarded by QEMU's user
network to the guest's dropbear.  A :class:`LinuxGuest` runs on any :class:`GuestVm`: a QEMU
:class:`~vmtests.machine.Machine` (:class:`QemuVm`) or a libvirt domain
(:class:`vmtests.libvirt_driver.LibvirtVm`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmtests import cpio
from vmtests.config import REPO, Settings
from vmtests.errors import HostKeyMismatch, VmError
from vmtests.machine import Machine
from vmtests.ssh import ClientKey, HostKey, Result, SshSession

BUILD_SCRIPT = REPO / "images" / "linux" / "build.py"
MEMORY_MB = 384
BOOT_TIMEOUT = 180.0  # a dead or paused VM fails at once; this only bounds a slow one
BUILD_TIMEOUT = 900.0
# Failures worth stopping the wait for SSH at once (QEMU pauses on KVM internal errors).
BAD_RUNSTATES = {"internal-error", "guest-panicked", "shutdown", "io-error"}


@dataclass(frozen=True)
class LinuxImage:
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str


def build_image(settings: Settings) -> LinuxImage:
    """Build (or reuse) the guest image with images/linux/build.py."""
    cache = settings.cache_dir / "linux"
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--cache", str(cache), "--json"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if proc.returncode != 0:
        raise VmError(f"Linux guest build failed: {proc.stderr.strip()[-400:]}")
    info = json.loads(proc.stdout)
    return LinuxImage(
        Path(info["kernel"]), Path(info["initrd"]), info["cmdline"], info["kernel_version"]
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BootFiles:
    """What one boot needs: the initramfs with this run's keys, the keys, the SSH port."""

    kernel: Path
    initrd: Path
    cmdline: str
    host_key: HostKey
    client_key: ClientKey
    ssh_port: int
    agent_socket: Path  # host side of the qemu-guest-agent channel (QEMU driver)

    @classmethod
    def make(
        cls, image: LinuxImage, run_dir: Path, name: str, module_groups: Sequence[str] = ()
    ) -> BootFiles:
        """``module_groups``: what /init loads besides networking (default: every group)."""
        host_key, client_key = HostKey.generate(), ClientKey.generate()
        overlay = cpio.gzipped(
            [
                cpio.regular(
                    "etc/dropbear/dropbear_ed25519_host_key", host_key.dropbear_file(), 0o600
                ),
                cpio.regular(
                    "root/.ssh/authorized_keys", client_key.authorized_line.encode(), 0o600
                ),
            ]
        )
        initrd = run_dir / f"{name}-initrd.gz"
        initrd.write_bytes(image.initrd.read_bytes() + overlay)
        cmdline = image.cmdline
        if module_groups:
            cmdline += " snapimg.load=" + ",".join(module_groups)
        return cls(
            image.kernel,
            initrd,
            cmdline,
            host_key,
            client_key,
            free_port(),
            run_dir / f"{name}-qga.sock",
        )

    def netdev(self) -> str:
        return f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"

    def qemu_args(self) -> list[str]:
        """Direct kernel boot, user networking with the SSH forward, exit on reboot/panic."""
        return [
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            self.cmdline,
            "-no-reboot",
            "-netdev",
            self.netdev(),
            "-device",
            "virtio-net-pci,netdev=net0",
            # entropy: dropbear waits for the kernel CRNG, which is slow to seed under TCG
            "-device",
            "virtio-rng-pci",
            *self.agent_args(),
        ]

    def agent_args(self) -> list[str]:
        """The guest agent's channel: a virtio-serial port named org.qemu.guest_agent.0 whose
        host side is the unix socket ``agent_socket`` (what ``snapimg ... --qga`` takes)."""
        return [
            "-chardev",
            f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]


class GuestVm(Protocol):
    """A virtual machine the rig can start, watch and stop (QEMU directly or via libvirt)."""

    name: str

    async def start(self) -> None: ...

    async def failure(self) -> str | None:
        """Why the machine can no longer come up (ended, paused on error), or None."""
        ...

    async def close(self) -> None: ...


class QemuVm:
    """A :class:`Machine` as a :class:`GuestVm`."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.name = machine.name

    async def start(self) -> None:
        await self.machine.start()

    async def failure(self) -> str | None:
        proc = self.machine.process
        if proc is None or proc.returncode is not None:
            return f"QEMU ended (status {proc.returncode if proc else None})"
        status = await self.machine.execute("query-status")
        if status["status"] in BAD_RUNSTATES:
            return f"QEMU run state {status['status']}"
        return None

    async def close(self) -> None:
        await self.machine.close()


class LinuxGuest:
    """A booted Linux guest: commands over SSH, each with a timeout, logged."""

    def __init__(self, vm: GuestVm, boot: BootFiles, log_dir: Path) -> None:
        self.vm = vm
        self.boot_files = boot
        self.log_file = log_dir / f"{vm.name}-ssh.log"
        self._ssh: SshSession | None = None

    async def boot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Start the VM and log in; seconds from start to a working SSH session."""
        began = time.monotonic()
        self.log_file.write_text("")
        await self.vm.start()
        deadline = began + timeout
        while self._ssh is None:
            if reason := await self.vm.failure():
                raise VmError(f"{self.vm.name}: {reason} before SSH answered")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(f"{self.vm.name}: no SSH login within {timeout:g}s")
            self._ssh = await asyncio.to_thread(
                SshSession.try_connect,
                self.boot_files.ssh_port,
                self.boot_files.client_key,
                self.boot_files.host_key,
                timeout=min(5.0, remaining),
                log_file=self.log_file,
            )
            if self._ssh is None:
                await asyncio.sleep(0.2)
        # SSH answers before /init has loaded the storage and filesystem drivers
        await self.run(
            "while [ ! -e /run/snapimg-ready ]; do sleep 0.05; done",
            timeout=max(1.0, deadline - time.monotonic()),
        )
        return time.monotonic() - began

    async def refuses_other_host_key(self) -> bool:
        """True when a login that pins some other host key is refused (the pin is enforced)."""
        try:
            session = await asyncio.to_thread(
                SshSession.try_connect,
                self.boot_files.ssh_port,
                self.boot_files.client_key,
                HostKey.generate(),
                timeout=10.0,
            )
        except HostKeyMismatch:
            return True
        if session is not None:
            session.close()
        return False

    async def run(
        self, command: str, *, timeout: float, stdin: bytes | None = None, check: bool = True
    ) -> Result:
        if self._ssh is None:
            raise VmError(f"{self.vm.name}: not booted")
        return await asyncio.to_thread(
            self._ssh.run, command, timeout=timeout, stdin=stdin, check=check
        )

    async def close(self) -> None:
        """Drop the SSH session and stop the VM (callers sync or unmount first)."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        await self.vm.close()
