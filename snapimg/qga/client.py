"""A blocking client of the QEMU guest agent protocol (qemu-ga over its virtio-serial port).

The host side of the agent's channel is a unix socket (QEMU: ``-chardev socket,path=SOCKET,
server=on,wait=off,id=qga0 -device virtio-serial -device virtserialport,chardev=qga0,
name=org.qemu.guest_agent.0``).  Requests and replies are QMP-style JSON objects, one reply
per line, but without QMP's greeting and capabilities negotiation.

Why not a library.  No maintained Python package (PyPI or Debian) speaks this protocol.
``qemu.qmp`` (used elsewhere in snapimg) can skip the greeting (``await_greeting=False``,
``negotiate=False``), but it does not fit the agent where reliability matters:

* the agent's byte stream outlives a client connection: the reply to a command whose client
  gave up (a timeout, a killed ``snapimg``) reaches the *next* client.  The schema's answer is
  ``guest-sync-delimited``: send a 0xFF byte (the agent drops any partial request it holds),
  then the command with a random id; ignore everything up to the 0xFF byte the agent puts in
  front of that reply, then every reply until the one carrying the id.  qemu.qmp can neither
  send the raw 0xFF byte nor skip one in its input (every line must parse as JSON);
* the agent answers the 0xFF flush with an error that has no ``id``; qemu.qmp treats exactly
  that as a server parse failure and drops the connection;
* after a timeout the stream must be resynchronised before the next command (the thaw after
  a freeze that did not answer in time): here the resync and the command go out in one write,
  so the agent has the thaw queued behind the freeze even if this process dies next.

``libvirt_qemu.qemuAgentCommand`` does all this for libvirt domains only (libvirt owns their
agent channel): :mod:`snapimg.qga.freezers` uses libvirt's fsFreeze/fsThaw API for them.

Every reply error carries the agent's error class (:class:`~snapimg.errors.QgaError`).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Literal

from snapimg.errors import QgaError, QgaTimeoutError

SENTINEL = b"\xff"
MAX_REPLY = 1 << 20
FreezeStatus = Literal["thawed", "frozen"]


class AgentClient:
    """One connection to a guest agent socket; commands are sent one at a time.

    ``timeout`` bounds each command (seconds until its reply).  After a command timed out,
    was interrupted or got a reply that made no sense, the next command is preceded by a
    resynchronisation (0xFF + ``guest-sync-delimited``) in the same write.
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self._dirty = True  # a fresh connection may hold stale replies of an earlier client

    # ---- connection --------------------------------------------------------------------

    def connect(self) -> None:
        """Connect and synchronise (so the agent is known to answer)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise QgaError(
                "no guest agent channel listens there (is the VM running with the channel?)",
                where=str(self.path),
            ) from None
        except OSError as err:
            sock.close()
            raise QgaError(f"cannot connect: {err.strerror}", where=str(self.path)) from None
        self._sock = sock
        self._buffer = b""
        self._dirty = True
        self.sync()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AgentClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- commands ----------------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """``guest-sync-delimited`` with a random id: the stream is clean afterwards."""
        self._dirty = True
        call = _Call("guest-sync-delimited", self.timeout if timeout is None else timeout)
        sync_id = self._send_sync(b"", call)
        self._await_sync(sync_id, call)
        self._dirty = False

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run ``command``; its ``return`` value.  The agent's errors raise QgaError with its
        error class; no reply within the timeout raises QgaTimeoutError."""
        call = _Call(command, self.timeout if timeout is None else timeout)
        request_id = self._request_id()
        request = _encode(command, arguments, request_id)
        if self._dirty:  # resync and command in one write: the agent queues both at once
            sync_id = self._send_sync(request, call)
            self._await_sync(sync_id, call)
        else:
            self._dirty = True
            self._send(request, call)
        reply = self._await_reply(request_id, call)
        self._dirty = False
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QgaError(
                str(error.get("desc", "no description")),
                command=command,
                error_class=str(error.get("class", "GenericError")),
                where=str(self.path),
            )
        return reply.get("return")

    def ping(self) -> None:
        self.execute("guest-ping")

    def fsfreeze_status(self) -> FreezeStatus:
        status = self.execute("guest-fsfreeze-status")
        if status not in ("thawed", "frozen"):
            raise self._error(f"unexpected status {status!r}", "guest-fsfreeze-status")
        result: FreezeStatus = status
        return result

    def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """Freeze every freezable guest filesystem; how many were frozen."""
        return self._count("guest-fsfreeze-freeze", timeout)

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """Thaw the guest's filesystems; how many this call thawed (0: none was frozen)."""
        return self._count("guest-fsfreeze-thaw", timeout)

    def _count(self, command: str, timeout: float | None) -> int:
        count = self.execute(command, timeout=timeout)
        if not isinstance(count, int) or isinstance(count, bool):
            raise self._error(f"answered {count!r}, not a count", command)
        return count

    # ---- wire --------------------------------------------------------------------------

    def _error(self, desc: str, command: str) -> QgaError:
        return QgaError(desc, command=command, where=str(self.path))

    def _request_id(self) -> str:
        self._next_id += 1
        return f"snapimg-{self._next_id}"

    def _send_sync(self, then: bytes, call: _Call) -> int:
        sync_id = secrets.randbelow(1 << 63)
        request = _encode("guest-sync-delimited", {"id": sync_id}, None)
        self._send(SENTINEL + request + then, call)
        return sync_id

    def _send(self, data: bytes, call: _Call) -> None:
        if self._sock is None:
            raise self._error("not connected", call.command)
        try:
            self._sock.settimeout(call.remaining(self.path))
            self._sock.sendall(data)
        except TimeoutError:
            raise call.timed_out(self.path) from None
        except OSError as err:
            raise self._error(f"cannot send: {err.strerror or err}", call.command) from None

    def _await_sync(self, sync_id: int, call: _Call) -> None:
        while True:
            self._skip_to_sentinel(call)
            line = self._read_line(call)
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # stale garbage after a sentinel: wait for the next one
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                return

    def _await_reply(self, request_id: str, call: _Call) -> dict[str, Any]:
        while True:
            line = self._read_line(call)
            try:
                reply = json.loads(line)
            except ValueError:
                raise self._error(f"unreadable reply {line[:80]!r}", call.command) from None
            if not isinstance(reply, dict):
                raise self._error(f"reply is not an object: {line[:80]!r}", call.command)
            if reply.get("id", request_id) == request_id:  # also an agent that echoes no id
                return reply
            # a late reply to a command abandoned earlier: skip it

    def _skip_to_sentinel(self, call: _Call) -> None:
        while (at := self._buffer.find(SENTINEL)) < 0:
            self._buffer = b""
            self._fill(call)
        self._buffer = self._buffer[at + 1 :]

    def _read_line(self, call: _Call) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_REPLY:
                raise self._error(f"reply longer than {MAX_REPLY} bytes", call.command)
            self._fill(call)
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        return line.strip()

    def _fill(self, call: _Call) -> None:
        assert self._sock is not None
        self._sock.settimeout(call.remaining(self.path))
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise call.timed_out(self.path) from None
        except OSError as err:
            raise self._error(f"connection failed: {err.strerror or err}", call.command) from None
        if not data:
            raise self._error("the agent channel closed the connection", call.command)
        self._buffer += data


class _Call:
    """One command's name and deadline."""

    def __init__(self, command: str, seconds: float) -> None:
        self.command = command
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def remaining(self, path: Path) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out(path)
        return left

    def timed_out(self, path: Path) -> QgaTimeoutError:
        return QgaTimeoutError(
            f"no answer within {self.seconds:g} s", command=self.command, where=str(path)
        )


def _encode(command: str, arguments: dict[str, Any] | None, request_id: str | None) -> bytes:
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    if request_id is not None:
        request["id"] = request_id
    return json.dumps(request).encode() + b"\n"
