"""Control socket server: one JSON request per line in, one JSON response per line out.

Request:  ``{"id": 1, "method": "create_snapshot", "params": {...}}``
Response: ``{"id": 1, "result": ...}`` or
          ``{"id": 1, "error": {"type": "SnapshotError", "message": "..."}}``
The methods and their parameters are listed in :data:`METHODS`; each maps onto one
Backend call, except ``record_quiesce``, which the server keeps itself
(:mod:`snapimg.control.quiesce_notes`) and merges into every snapshot it reports.
A malformed request, a parameter of the wrong type or range, an unknown method or
parameter, and any refusal get one ``error`` line; the connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from snapimg.backends.base import Backend
from snapimg.control.quiesce_notes import QuiesceNotes
from snapimg.errors import ControlError, SnapimgError, SnapshotError
from snapimg.names import shown
from snapimg.snapinfo import ON_FULL_CHOICES, SnapshotInfo
from snapimg.sockpath import prepare_unix_socket_path
from snapimg.units import MAX_BYTES

log = logging.getLogger(__name__)
_MAX_LINE = 1 << 20

Handler = Callable[["ControlServer", dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Param:
    """One parameter of a control method: its JSON type and whether it may be left out.

    ``str``: a non-empty string, or any string for a ``name`` (an origin or snapshot name:
    the backend checks it by :mod:`snapimg.names` or looks it up, so the control socket
    refuses a name with the message the CLI and the library give); ``int``: an integer
    from 0 to :data:`~snapimg.units.MAX_BYTES`; ``bool``: true or false; ``choices``: one
    of these strings.  An optional parameter may be missing or null (``default`` is used).
    """

    name: str
    kind: type
    optional: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    is_name: bool = False

    def value(self, params: dict[str, Any]) -> Any:
        value = params.get(self.name)
        if value is None:
            if self.optional:
                return self.default
            raise ControlError(f"missing parameter {self.name!r}")
        if self.choices:
            if not isinstance(value, str) or value not in self.choices:
                raise ControlError(
                    f"parameter {self.name!r} must be one of {', '.join(self.choices)}"
                )
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise ControlError(f"parameter {self.name!r} must be true or false")
        elif self.kind is int:
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not (0 <= value <= MAX_BYTES)
            ):
                raise ControlError(
                    f"parameter {self.name!r} must be an integer from 0 to {MAX_BYTES}"
                )
        elif self.is_name:
            if not isinstance(value, str):
                raise ControlError(f"parameter {self.name!r} must be a string")
        elif not isinstance(value, str) or not value:
            raise ControlError(f"parameter {self.name!r} must be a non-empty string")
        return value


@dataclass(frozen=True)
class Method:
    handler: Handler
    params: tuple[Param, ...] = ()

    def arguments(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        known = {p.name for p in self.params}
        unknown = sorted(str(k) for k in params if k not in known)
        if unknown:
            raise ControlError(f"unknown parameter {shown(unknown[0])} of method {name}")
        return {p.name: p.value(params) for p in self.params}


_ORIGIN = Param("origin", str, is_name=True)
_SNAP = Param("snap", str, is_name=True)


async def _exports(server: ControlServer, args: dict[str, Any]) -> Any:
    return [
        {"name": e.name, "size": e.size, "read_only": e.read_only, "uri": e.uri}
        for e in await server.backend.exports()
    ]


async def _create(server: ControlServer, args: dict[str, Any]) -> Any:
    backend = server.backend
    info = await backend.create_snapshot(
        args["origin"],
        args["snap"],
        max_size=args["max_size"],
        writable=args["writable"],
        on_full=args["on_full"],
    )
    uri = next((e.uri for e in await backend.exports() if e.name == info.name), None)
    return {"snapshot": info.to_json(), "uri": uri}


async def _drop(server: ControlServer, args: dict[str, Any]) -> Any:
    origin, snap = args["origin"], args["snap"]
    await server.backend.drop_snapshot(origin, snap)
    if server.notes is not None:
        await asyncio.to_thread(server.notes.forget, f"{origin}@{snap}")
    return None


async def _list(server: ControlServer, args: dict[str, Any]) -> Any:
    return [info.to_json() for info in await server.snapshots()]


async def _record_quiesce(server: ControlServer, args: dict[str, Any]) -> Any:
    """The client froze the guest around this snapshot's creation for ``frozen_ms``."""
    origin, snap, created = args["origin"], args["snap"], args["created"]
    if server.notes is None:
        raise ControlError("this server keeps no quiesce records (no store directory)")
    infos = await server.backend.list_snapshots()
    info = next((i for i in infos if i.name == f"{origin}@{snap}"), None)
    if info is None:
        raise SnapshotError(f"unknown snapshot {shown(f'{origin}@{snap}')}")
    if created is not None and _parse_time(created) != info.created:
        raise SnapshotError(
            f"snapshot {origin}@{snap} was created at {info.created.isoformat()}, "
            f"not {shown(created)}"
        )
    notes = server.notes
    return (await asyncio.to_thread(notes.record, info, args["frozen_ms"], infos)).to_json()


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ControlError(f"parameter 'created' is not an ISO 8601 time: {shown(value)}") from None


async def _release(server: ControlServer, args: dict[str, Any]) -> Any:
    offset, length = await server.backend.release(
        args["origin"], args["snap"], args["offset"], args["length"]
    )
    return {"offset": offset, "length": length}


async def _changed(server: ControlServer, args: dict[str, Any]) -> Any:
    ranges = await server.backend.changed_ranges(args["origin"], args["snap"])
    return [[offset, length] for offset, length in ranges]


async def _ping(server: ControlServer, args: dict[str, Any]) -> Any:
    return {"pid": os.getpid()}


METHODS: dict[str, Method] = {
    "ping": Method(_ping),
    "exports": Method(_exports),
    "create_snapshot": Method(
        _create,
        (
            _ORIGIN,
            _SNAP,
            Param("max_size", int, optional=True),
            Param("writable", bool, optional=True, default=False),
            Param("on_full", str, optional=True, default="invalidate", choices=ON_FULL_CHOICES),
        ),
    ),
    "drop_snapshot": Method(_drop, (_ORIGIN, _SNAP)),
    "list_snapshots": Method(_list),
    "release": Method(_release, (_ORIGIN, _SNAP, Param("offset", int), Param("length", int))),
    "changed_ranges": Method(_changed, (_ORIGIN, _SNAP)),
    "record_quiesce": Method(
        _record_quiesce,
        (_ORIGIN, _SNAP, Param("frozen_ms", int), Param("created", str, optional=True)),
    ),
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> dict[str, Any]:
    """The JSON object of one request line; :class:`ControlError` if it is none."""
    try:
        request = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ControlError("request is not JSON") from None
    if not isinstance(request, dict):
        raise ControlError("request must be a JSON object")
    return request


def method_and_params(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method = request.get("method")
    params = request.get("params")
    if not isinstance(method, str):
        raise ControlError("request has no method name")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ControlError("params must be a JSON object")
    return method, params


_MAX_MESSAGE = 300


def _args_text(args: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in args.items() if v is not None)


def one_line(err: BaseException) -> str:
    """The error as one line of at most ``_MAX_MESSAGE`` characters (names a client sent
    may be long: a message quoting one is cut)."""
    text = " ".join(str(err).splitlines()) or type(err).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 30] + f"... ({len(text)} characters)"
    return text


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
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over the limit: say so, then hang up
                    error = {"type": "ControlError", "message": f"request over {_MAX_LINE} bytes"}
                    writer.write(json.dumps({"id": None, "error": error}).encode() + b"\n")
                    await writer.drain()
                    break
                if not line:
                    break
                response = await self._answer(line)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except ConnectionError as err:
            log.debug("control connection ended: %s", err)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        req_id: Any = None
        try:
            request = parse_request(line)
            req_id = request.get("id")
            name, params = method_and_params(request)
            method = METHODS.get(name)
            if method is None:
                raise ControlError(f"unknown method {shown(name)}")
            args = method.arguments(name, params)
            async with self._lock:
                result = await method.handler(self, args)
            log.info("control: %s %s: done", name, _args_text(args))
            return {"id": req_id, "result": result}
        except SnapimgError as err:
            log.info("control: refused: %s", one_line(err))
            return {"id": req_id, "error": {"type": type(err).__name__, "message": one_line(err)}}
        except Exception as err:
            log.exception("control request failed")
            return {"id": req_id, "error": {"type": "InternalError", "message": one_line(err)}}
