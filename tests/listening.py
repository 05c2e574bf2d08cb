"""Waiting for a server a test started to accept connections on its unix socket.

A server binds (the socket file appears) before it listens; a connect in between is
refused.  So a test waits for a connection to succeed, not for the file.  The probe
connection is closed at once: NBD servers and qemu-ga take the next client as usual.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def wait_listening(sock: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    """Return once ``sock`` accepts a connection; AssertionError if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before it listened")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not listen on {sock} in {timeout} s") from None
            time.sleep(0.02)
        finally:
            probe.close()
