"""Control socket server: one JSON request per line in, one JSON response per line out.

Request:  ``{"id": 1, "method": "create_snapshot", "params": {...}}``
Response: ``{"id": 1, "result": ...}`` or
          ``{"id": 1, "error": {"type": "SnapshotError", "message": "..."}}``
The methods are listed in :data:`METHODS`; each maps onto one Backend call, except
``record_quiesce``, which the server keeps itself (:mod:`snapimg.control.quiesce_notes`) and
merges into every snapshot it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from snapimg.backends.base import ON_FULL_CHOICES, Backend, SnapshotInfo
from snapimg.control.quiesce_notes import QuiesceNotes
from snapimg.errors import ControlError, SnapimgError, SnapshotError
from snapimg.nbd.server import prepare_unix_socket_path

log = logging.getLogger(__name__)
_MAX_LINE = 1 << 20

Handler = Callable[["ControlServer", dict[str, Any]], Awaitable[Any]]


def _str(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"parameter {key!r} must be a non-empty string")
    return value


def _int(params: dict[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = params.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ControlError(f"parameter {key!r} must be a non-negative integer")
    return value


async def _exports(server: ControlServer, params: dict[str, Any]) -> Any:
    return [
        {"name": e.name, "size": e.size, "read_only": e.read_only, "uri": e.uri}
        for e in await server.backend.exports()
    ]


async def _create(server: ControlServer, params: dict[str, Any]) -> Any:
    backend = server.backend
    on_full = params.get("on_full", "invalidate")
    if on_full not in ON_FULL_CHOICES:
        raise ControlError(f"on_full must be one of {', '.join(ON_FULL_CHOICES)}")
    info = await backend.create_snapshot(
        _str(params, "origin"),
        _str(params, "snap"),
        max_size=_int(params, "max_size", optional=True),
        writable=bool(params.get("writable", False)),
        on_full=on_full,
    )
    uri = next((e.uri for e in await backend.exports() if e.name == info.name), None)
    return {"snapshot": info.to_json(), "uri": uri}


async def _drop(server: ControlServer, params: dict[str, Any]) -> Any:
    origin, snap = _str(params, "origin"), _str(params, "snap")
    await server.backend.drop_snapshot(origin, snap)
    if server.notes is not None:
        await asyncio.to_thread(server.notes.forget, f"{origin}@{snap}")
    return None


async def _list(server: ControlServer, params: dict[str, Any]) -> Any:
    return [info.to_json() for info in await server.snapshots()]


async def _record_quiesce(server: ControlServer, params: dict[str, Any]) -> Any:
    """The client froze the guest around this snapshot's creation for ``frozen_ms``."""
    origin, snap = _str(params, "origin"), _str(params, "snap")
    frozen_ms = _int(params, "frozen_ms")
    assert frozen_ms is not None
    created = params.get("created")
    if server.notes is None:
        raise ControlError("this server keeps no quiesce records (no store directory)")
    infos = await server.backend.list_snapshots()
    info = next((i for i in infos if i.name == f"{origin}@{snap}"), None)
    if info is None:
        raise SnapshotError(f"unknown snapshot {origin}@{snap}")
    if created is not None and _parse_time(created) != info.created:
        raise SnapshotError(f"snapshot {origin}@{snap} was created at "
                            f"{info.created.isoformat()}, not {created}")
    return (await asyncio.to_thread(server.notes.record, info, frozen_ms, infos)).to_json()


def _parse_time(value: object) -> datetime:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise ControlError(f"parameter 'created' is not an ISO 8601 time: {value!r}") from None


async def _release(server: ControlServer, params: dict[str, Any]) -> Any:
    offset = _int(params, "offset")
    length = _int(params, "length")
    assert offset is not None and length is not None
    await server.backend.release(_str(params, "origin"), _str(params, "snap"), offset, length)
    return None


async def _changed(server: ControlServer, params: dict[str, Any]) -> Any:
    ranges = await server.backend.changed_ranges(_str(params, "origin"), _str(params, "snap"))
    return [[offset, length] for offset, length in ranges]


async def _ping(server: ControlServer, params: dict[str, Any]) -> Any:
    return {"pid": os.getpid()}


METHODS: dict[str, Handler] = {
    "ping": _ping,
    "exports": _exports,
    "create_snapshot": _create,
    "drop_snapshot": _drop,
    "list_snapshots": _list,
    "release": _release,
    "changed_ranges": _changed,
    "record_quiesce": _record_quiesce,
}


class ControlServer:
    def __init__(self, backend: Backend, notes: QuiesceNotes | None = None) -> None:
        self.backend = backend
        self.notes = notes
        self._server: asyncio.Server | None = None
        self._path: Path | None = None
        self._lock = asyncio.Lock()  # one lifecycle request at a time

    async def snapshots(self) -> list[SnapshotInfo]:
        infos = await self.backend.list_snapshots()
        if self.notes is None:
            return infos
        return await asyncio.to_thread(self.notes.annotate, infos)

    async def listen(self, path: Path) -> None:
        prepare_unix_socket_path(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=_MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                response = await self._answer(line)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError) as err:  # ValueError: line over the limit
            log.debug("control connection ended: %s", err)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        req_id: Any = None
        try:
            try:
                request = json.loads(line)
            except ValueError:
                raise ControlError("request is not JSON") from None
            if not isinstance(request, dict):
                raise ControlError("request must be a JSON object")
            req_id = request.get("id")
            method = METHODS.get(request.get("method", ""))
            params = request.get("params") or {}
            if method is None:
                raise ControlError(f"unknown method {request.get('method')!r}")
            if not isinstance(params, dict):
                raise ControlError("params must be a JSON object")
            async with self._lock:
                result = await method(self, params)
            return {"id": req_id, "result": result}
        except SnapimgError as err:
            return {"id": req_id, "error": {"type": type(err).__name__, "message": str(err)}}
        except Exception as err:
            log.exception("control request failed")
            return {"id": req_id, "error": {"type": "InternalError", "message": repr(err)}}
