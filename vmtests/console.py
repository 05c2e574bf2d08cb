"""Serial consoles of a guest: lines read from QEMU chardev sockets, logged, waited on.

A :class:`Console` holds several named ports (e.g. ``com1`` for a guest program's own lines,
``screen`` for the firmware's copy of the screen).  :meth:`Console.expect` waits until a
success pattern appears on one port, and fails at once when a failure pattern appears on any
watched port, when the port closes (QEMU ended) or when the timeout passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import socket
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmtests.errors import VmError

Pattern = str | re.Pattern[str]


def _compile(patterns: Sequence[Pattern]) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


@dataclass
class _Port:
    log_path: Path
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() at arrival
    partial: str = ""
    closed: bool = False
    cursor: int = 0  # first line not consumed by expect()
    received: int = 0  # bytes read from the socket so far
    sock: socket.socket | None = None
    task: asyncio.Task[None] | None = None


class Console:
    def __init__(self, log_dir: Path, prefix: str, timeout_scale: float = 1.0) -> None:
        self._timeout_scale = timeout_scale  # multiplies every expect() timeout
        self._log_dir = log_dir
        self._prefix = prefix
        self._ports: dict[str, _Port] = {}
        self._changed = asyncio.Event()

    def log_path(self, port: str) -> Path:
        return self._log_dir / f"{self._prefix}-{port}.log"

    async def attach(self, port: str, socket_path: Path, timeout: float) -> None:
        """Connect to QEMU's chardev server socket and start reading ``port``."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmError(f"serial port {port}: cannot connect to {socket_path}") from err
                await asyncio.sleep(0.02)
        state = _Port(self.log_path(port), sock=sock)
        state.log_path.write_text("")
        self._ports[port] = state
        state.task = asyncio.create_task(self._pump(state, sock))

    async def _pump(self, state: _Port, sock: socket.socket) -> None:
        # straight from the socket (no stream buffer between): a byte is either still in
        # the kernel's queue or in lines/partial, which catch_up() relies on
        loop = asyncio.get_running_loop()
        try:
            with state.log_path.open("a", encoding="utf-8") as log:
                while True:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        break
                    state.received += len(chunk)
                    text = chunk.decode("latin-1").replace("\r", "")
                    log.write(text)
                    log.flush()
                    state.partial += text
                    *complete, state.partial = state.partial.split("\n")
                    if complete:
                        state.lines.extend(complete)
                        state.times.extend([time.monotonic()] * len(complete))
                        self._changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            if state.partial:
                state.lines.append(state.partial)
                state.times.append(time.monotonic())
                state.partial = ""
            state.closed = True
            self._changed.set()
            sock.close()

    def lines(self, port: str = "com1") -> list[str]:
        return list(self._ports[port].lines)

    def timed_lines(self, port: str = "com1") -> list[tuple[float, str]]:
        """(arrival time, line) pairs; time.monotonic() clock."""
        state = self._ports[port]
        return list(zip(state.times, state.lines, strict=True))

    async def catch_up(self, port: str = "com1", timeout: float = 30) -> None:
        """Wait until every byte QEMU had written to ``port`` by now is in :meth:`lines`.

        QEMU's serial devices write what the guest sends to the chardev socket at once, so
        a line the guest printed before some event (a snapshot) is in the lines after this.
        """
        state = self._ports[port]
        if state.sock is None or state.closed:
            return
        queued = struct.unpack("i", fcntl.ioctl(state.sock.fileno(), termios.FIONREAD, b"\0" * 4))
        target = state.received + queued[0]
        deadline = time.monotonic() + timeout * self._timeout_scale
        while state.received < target and not state.closed:
            if time.monotonic() > deadline:
                raise VmError(f"serial port {port}: {target - state.received} bytes not read")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)

    def mark(self, port: str = "com1") -> int:
        """How many complete lines ``port`` has received so far."""
        return len(self._ports[port].lines)

    async def expect(
        self,
        success: Sequence[Pattern],
        failure: Sequence[Pattern] = (),
        *,
        timeout: float,
        phase: str,
        port: str = "com1",
        watch: Mapping[str, Sequence[Pattern]] | None = None,
    ) -> re.Match[str]:
        """Wait for a success pattern on ``port`` after the last consumed line.

        Raises VmError when a failure pattern matches on ``port`` or on a ``watch`` port,
        when ``port`` closes, or after ``timeout`` seconds.
        """
        ok = _compile(success)
        bad: dict[str, list[re.Pattern[str]]] = {port: _compile(failure)}
        for name, patterns in (watch or {}).items():
            bad.setdefault(name, []).extend(_compile(patterns))
        scanned = {name: self._ports[name].cursor for name in bad}
        timeout *= self._timeout_scale
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            for name, patterns in bad.items():
                state = self._ports[name]
                for index in range(scanned[name], len(state.lines)):
                    line = state.lines[index]
                    if name == port:
                        for pattern in ok:
                            match = pattern.search(line)
                            if match:
                                state.cursor = index + 1
                                return match
                    for pattern in patterns:
                        if pattern.search(line):
                            raise VmError(f"{phase}: guest reported failure on {name}: {line!r}")
                scanned[name] = len(state.lines)
            if self._ports[port].closed:
                raise VmError(f"{phase}: {port} closed (QEMU ended) before {_show(ok)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError(f"{phase}: timed out after {timeout:g}s waiting for {_show(ok)}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def close(self) -> None:
        for state in self._ports.values():
            if state.task is not None:
                state.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.task


def _show(patterns: Sequence[re.Pattern[str]]) -> str:
    return " or ".join(repr(p.pattern) for p in patterns)
