"""A thin typed wrapper over qemu.qmp's asyncio :class:`QMPClient`.

Every failure (a refused command, a lost connection) becomes one
:class:`snapimg.errors.QemuError` carrying the QMP error class, QEMU's description and
the command as fields, its text a single line naming them:
``QMP error CLASS: DESC (command NAME)``.  :func:`execute` is the one place that turns
qemu.qmp's errors into it, for :class:`Qmp` and the VM test rig's machines alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from snapimg.errors import QemuError

JSON = dict[str, Any]

# qemu.qmp logs refused connections and disconnects at ERROR level; snapimg reports them
# itself as one-line QemuErrors, so keep the library's records off stderr.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


async def execute(
    client: QMPClient,
    command: str,
    arguments: Mapping[str, object] | None = None,
    *,
    where: str | None = None,
) -> Any:
    """Run ``command`` on ``client``; return its ``return`` value or raise
    :class:`QemuError`: with QEMU's error class and description when QEMU refused it,
    without an error class when the connection was lost.  ``where`` names the QEMU
    process in the message."""
    try:
        return await client.execute(command, arguments)
    except ExecuteError as err:
        raise QemuError(
            _one_line(str(err)), error_class=err.error_class, command=command, where=where
        ) from None
    except (QMPError, OSError, EOFError) as err:
        detail = _one_line(str(err)) or type(err).__name__
        raise QemuError(f"QMP connection lost: {detail}", command=command, where=where) from None


class Qmp:
    """One QMP session to a QEMU process (qemu-storage-daemon or qemu-system-*)."""

    def __init__(self, client: QMPClient, path: Path) -> None:
        self._client = client
        self.path = path

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 10.0) -> Qmp:
        client = QMPClient("snapimg")
        try:
            await asyncio.wait_for(client.connect(str(path)), timeout)
        except (TimeoutError, OSError, QMPError) as err:
            detail = _one_line(str(err)) or type(err).__name__
            raise QemuError(f"cannot connect to QMP socket {path}: {detail}") from None
        return cls(client, path)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run ``command``; return its ``return`` value or raise :class:`QemuError`
        (:func:`execute`)."""
        return await execute(self._client, command, arguments)

    async def hmp(self, command_line: str) -> str:
        """Run a human monitor command; QEMU reports its errors in the returned text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    async def node_names(self) -> set[str]:
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"] for n in nodes}

    async def export_ids(self) -> set[str]:
        return {e["id"] for e in await self.execute("query-block-exports")}

    async def close(self) -> None:
        # After "quit" the peer is gone and disconnect() may re-raise the EOF.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
