"""Two ways to freeze a guest's filesystems: its agent socket, or libvirt's agent connection.

A :class:`Freezer` freezes and thaws; :func:`open_freezer` picks one.  For a VM that snapimg
can reach through its agent socket (QEMU started with the channel), :class:`AgentFreezer`
speaks the agent protocol itself (:mod:`snapimg.qga.client`).  A libvirt domain's agent
channel belongs to libvirtd, which allows one client: :class:`LibvirtFreezer` asks libvirt
(``virDomainFSFreeze`` / ``virDomainFSThaw``), which runs its own guest-sync first and gives
up with "Guest agent is not responding" when the agent does not answer it within 5 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from snapimg.errors import QgaError, QgaTimeoutError
from snapimg.qga.client import AgentClient, FreezeStatus

LIBVIRT_URI = "qemu:///system"


class Freezer(Protocol):
    where: str  # for messages: the socket or the domain
    thaw_hint: str  # the snapimg command that thaws this guest by hand

    def status(self) -> FreezeStatus | None:
        """The agent's freeze state, or None where asking would cost more than it tells."""
        ...

    def freeze(self, timeout: float) -> int:
        """Freeze the guest's filesystems; how many."""
        ...

    def thaw(self, timeout: float) -> int:
        """Thaw them; how many this call thawed."""
        ...

    def close(self) -> None: ...


class AgentFreezer:
    def __init__(self, socket: Path, timeout: float) -> None:
        self.where = str(socket)
        self.thaw_hint = f"snapimg thaw --qga {socket}"
        self.client = AgentClient(socket, timeout)
        self.client.connect()

    def status(self) -> FreezeStatus | None:
        return self.client.fsfreeze_status()

    def freeze(self, timeout: float) -> int:
        return self.client.fsfreeze_freeze(timeout)

    def thaw(self, timeout: float) -> int:
        return self.client.fsfreeze_thaw(timeout)

    def close(self) -> None:
        self.client.close()


class LibvirtFreezer:
    def __init__(self, domain: str, uri: str = LIBVIRT_URI) -> None:
        try:
            import libvirt
        except ImportError:
            raise QgaError(
                "--libvirt needs the libvirt Python binding (pip install libvirt-python)"
            ) from None
        self._libvirt: Any = libvirt
        self.where = f"libvirt domain {domain}"
        self.thaw_hint = f"snapimg thaw --libvirt {domain}"
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as err:
            raise QgaError(err.get_error_message(), where=f"libvirt {uri}") from None
        try:
            self.dom = self.conn.lookupByName(domain)
        except libvirt.libvirtError as err:
            self.conn.close()
            raise QgaError(err.get_error_message(), where=self.where) from None

    def status(self) -> FreezeStatus | None:
        return None  # only qemuAgentCommand could tell, and it taints the domain

    def agent_status(self, timeout: float) -> FreezeStatus:
        """The agent's own answer through libvirt_qemu.qemuAgentCommand (marks the domain
        tainted with custom-ga-command: for tests and diagnosis only)."""
        import libvirt_qemu

        try:
            text = libvirt_qemu.qemuAgentCommand(
                self.dom, json.dumps({"execute": "guest-fsfreeze-status"}), int(timeout), 0
            )
        except self._libvirt.libvirtError as err:
            raise self._error(err, "guest-fsfreeze-status") from None
        status: FreezeStatus = json.loads(text)["return"]
        return status

    def freeze(self, timeout: float) -> int:
        try:
            return int(self.dom.fsFreeze(None, 0))
        except self._libvirt.libvirtError as err:
            raise self._error(err, "virDomainFSFreeze") from None

    def thaw(self, timeout: float) -> int:
        try:
            return int(self.dom.fsThaw(None, 0))
        except self._libvirt.libvirtError as err:
            raise self._error(err, "virDomainFSThaw") from None

    def _error(self, err: Any, command: str) -> QgaError:
        kind = (
            QgaTimeoutError
            if err.get_error_code() == self._libvirt.VIR_ERR_AGENT_UNRESPONSIVE
            else QgaError
        )
        return kind(err.get_error_message(), command=command, where=self.where)

    def close(self) -> None:
        self.conn.close()


def open_freezer(
    *,
    qga: Path | None = None,
    libvirt_domain: str | None = None,
    libvirt_uri: str = LIBVIRT_URI,
    timeout: float = 10.0,
) -> Freezer:
    """The agent socket when given, else the libvirt domain; connected and in sync."""
    if qga is not None:
        return AgentFreezer(qga, timeout)
    if libvirt_domain is not None:
        return LibvirtFreezer(libvirt_domain, libvirt_uri)
    raise QgaError("no guest agent given: a --qga SOCKET or a --libvirt DOMAIN is needed")
