"""Blocking client of the control socket (used by the CLI; fine for scripts too)."""

from __future__ import annotations

import json
import logging
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from snapimg import errors
from snapimg.errors import ControlError, SnapimgError
from snapimg.snapinfo import SnapshotInfo

log = logging.getLogger(__name__)
_MAX_RESPONSE = 64 << 20  # a list of many snapshots is long; anything longer is not ours


class ControlClient:
    def __init__(self, path: Path, timeout: float = 300.0) -> None:
        self.path = path
        self.timeout = timeout
        self._next_id = 0

    def call(self, method: str, **params: Any) -> Any:
        """Send one request and wait for its response; server-side refusals come back
        as the same SnapimgError subclass the server raised.  Anything that is not a
        snapimg control socket (an NBD socket, a QMP socket, a file) is a ControlError."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                if self.path.exists() and not self.path.is_socket():
                    raise ControlError(f"{self.path} is not a socket") from None
                raise ControlError(f"no snapimg server is running at {self.path}") from None
            except OSError as err:
                raise ControlError(f"cannot connect to {self.path}: {err.strerror}") from None
            self._next_id += 1
            request = {"id": self._next_id, "method": method, "params": params}
            log.debug("-> %s", request)
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = sock.makefile("rb").readline(_MAX_RESPONSE)
            log.debug("<- %s", line[:1000].decode(errors="replace").rstrip())
        except TimeoutError:
            raise ControlError(f"no answer from {self.path} within {self.timeout:.0f} s") from None
        except OSError as err:
            raise ControlError(f"control socket {self.path}: {err.strerror or err}") from None
        finally:
            sock.close()
        if not line:
            raise ControlError(f"the server at {self.path} closed the connection")
        response = self._response(line)
        if "error" in response:
            error = response["error"]
            if not isinstance(error, dict):
                raise self._not_control(line)
            raise _error(error)
        return response["result"]

    def _response(self, line: bytes) -> dict[str, Any]:
        try:
            response = json.loads(line)
        except ValueError:
            raise self._not_control(line) from None
        if (
            not isinstance(response, dict)
            or response.get("id") != self._next_id
            or ("result" not in response and "error" not in response)
        ):
            raise self._not_control(line)
        return response

    def _not_control(self, line: bytes) -> ControlError:
        start = line[:16].decode("ascii", "replace")
        what = "an NBD server" if line.startswith(b"NBDMAGIC") else f"it answered {start!r}"
        return ControlError(f"{self.path} is not a snapimg control socket ({what})")

    def create_snapshot(
        self, origin: str, snap: str, *, max_size: int | None, writable: bool, on_full: str
    ) -> tuple[SnapshotInfo, str | None]:
        result = self.call(
            "create_snapshot",
            origin=origin,
            snap=snap,
            max_size=max_size,
            writable=writable,
            on_full=on_full,
        )
        return snapshot_info_from_json(result["snapshot"]), result["uri"]

    def record_quiesce(
        self, origin: str, snap: str, frozen_ms: int, created: datetime | None = None
    ) -> SnapshotInfo:
        """Record that ``origin@snap`` (created at ``created``, if given) was taken while the
        guest was frozen for ``frozen_ms``: ``snapshot list`` shows it from then on."""
        result = self.call(
            "record_quiesce",
            origin=origin,
            snap=snap,
            frozen_ms=frozen_ms,
            created=None if created is None else created.isoformat(),
        )
        return snapshot_info_from_json(result)

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [snapshot_info_from_json(obj) for obj in self.call("list_snapshots")]

    def drop_snapshot(self, origin: str, snap: str) -> None:
        self.call("drop_snapshot", origin=origin, snap=snap)

    def release(self, origin: str, snap: str, offset: int, length: int) -> tuple[int, int]:
        """Release whole blocks of the range; returns the (offset, length) released."""
        result = self.call("release", origin=origin, snap=snap, offset=offset, length=length)
        if not isinstance(result, dict):  # a server from before releases were reported
            return offset, length
        return int(result["offset"]), int(result["length"])

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        return [(o, n) for o, n in self.call("changed_ranges", origin=origin, snap=snap)]

    def exports(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("exports")
        return result


def _error(obj: dict[str, Any]) -> SnapimgError:
    cls = getattr(errors, str(obj.get("type")), None)
    message = str(obj.get("message", "request failed"))
    if isinstance(cls, type) and issubclass(cls, SnapimgError):
        return cls(message)
    return ControlError(message)


def snapshot_info_from_json(obj: dict[str, Any]) -> SnapshotInfo:
    """Inverse of :meth:`SnapshotInfo.to_json`."""
    return SnapshotInfo(
        origin=obj["origin"],
        snap=obj["snapshot"],
        created=datetime.fromisoformat(obj["created"]),
        valid=obj["state"] == "valid",
        reason=obj["reason"],
        preserved_blocks=obj["preserved_blocks"],
        preserved_bytes=obj["preserved_bytes"],
        max_size=obj["max_size"],
        block_size=obj["block_size"],
        writable=obj["writable"],
        on_full=obj["on_full"],
        quiesced=bool(obj.get("quiesced", False)),
        frozen_ms=obj.get("frozen_ms"),
    )
