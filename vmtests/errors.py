"""The VM test rig's own error: not part of snapimg's error tree (snapimg.errors), which is
the product's.  ``python -m vmtests`` prints it as one line, as it does snapimg's errors."""

from __future__ import annotations


class VmError(Exception):
    """A guest did not boot, timed out or reported failure; a tool of the rig failed."""


class HostKeyMismatch(VmError):
    """The guest's SSH server showed a host key other than the pinned one."""

    def __init__(self, host: str, port: int, detail: str) -> None:
        super().__init__(f"ssh {host}:{port}: host key mismatch: {detail}")
        self.host = host
        self.port = port
