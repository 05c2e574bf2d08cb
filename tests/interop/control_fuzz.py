"""A structure-aware fuzzer for the control socket of ``snapimg serve`` (issue 14).

It knows the protocol's structure from the server's own table
(:data:`snapimg.control.server.METHODS`: every method and each of its parameters) and
mutates one part of a valid request at a time: each parameter of each method takes
hostile values (wrong JSON types, out-of-range and boundary integers, names the rule
refuses, huge, empty, control and non-ASCII strings, nested containers), parameters go
missing or unknown ones appear, and whole lines are broken (not JSON, not UTF-8, not an
object, NaN, deep nesting, over the 1 MiB line limit).

For every request it checks one JSON response line with the request's id and either a
result or an error whose type is a snapimg error class (never ``InternalError``) and
whose message is one non-empty line.  It keeps a model of the snapshots the server must
have (a create that answered with a result made one, a drop removed one) and compares it
with ``list_snapshots`` regularly: a failed create must leave no snapshot (nor, on the
qsd backend, a target file in the store).  Used by tests/interop/test_control_fuzz.py and
bench/control_fuzz.py.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapimg.control.server import METHODS, Param

LINE_LIMIT = 1 << 20
BLOCK = 65536

# Values of every JSON type, boundaries of the integer range, names the rule refuses.
HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, BLOCK - 1, BLOCK, BLOCK + 1, 4 << 20, (4 << 20) + 1,
    2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 1.5, -0.0, 1e308,
    "", " ", "  ", "\t", "\n", "\x00", "\x7f", "\u00a0", "\ud800", "d", "keep", "@", "/",
    "d@keep", "a@b", "a/b", " lead", "trail ", "é", "日本", "x" * 100, "x" * 101, "x" * 5000,
    "invalidate", "block-writes", "1G", "64K", "NaN", "null", "true", "0",
    [], [1], ["d"], {}, {"a": 1}, [[[[[]]]]], {"origin": "d"},
]  # fmt: skip

RAW_LINES: list[bytes] = [
    b"\n", b" \n", b"{\n", b"}\n", b"[]\n", b"null\n", b"1\n", b'"ping"\n', b"\xff\xfe\n",
    b'{"id": 1}\n', b'{"method": 5}\n', b'{"method": null}\n', b'{"method": ["ping"]}\n',
    b'{"method": {"a": 1}}\n', b'{"method": "ping", "params": []}\n',
    b'{"method": "ping", "params": "x"}\n', b'{"method": "ping", "params": {"x": 1}}\n',
    b'{"id": NaN, "method": "ping"}\n', b'{"id": Infinity, "method": "ping"}\n',
    b'{"id": 1, "method": "ping", "method": "exports"}\n', b"[" * 100_000 + b"\n",
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"\n", b'{"id": 1e999, "method": "ping"}\n',
    b'{"id": ' + b"9" * 5000 + b', "method": "ping"}\n',
]  # fmt: skip

ODD_IDS: list[Any] = ["x", -5, 2**70, "é", 3.5, [1, 2], {"a": None}, ""]

GOOD_ERROR_TYPES = {
    "ControlError", "UsageError", "SnapshotError", "StoreError", "DeviceError",
    "OutOfRangeError", "SnapshotInvalidError", "ReleasedRangeError", "NoSpaceError",
}  # fmt: skip


class FuzzFailure(AssertionError):
    """The server broke a rule; the message names the request."""


@dataclass
class Report:
    requests: int = 0
    results: int = 0
    errors: int = 0
    reconnects: int = 0
    checks: int = 0
    error_types: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "results": self.results,
            "errors": self.errors,
            "error_types": dict(sorted(self.error_types.items())),
            "reconnects": self.reconnects,
            "model_checks": self.checks,
            "internal_errors": self.error_types.get("InternalError", 0),
            "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else None,
        }


class Fuzzer:
    def __init__(self, control: Path, origin: str, seed: int, store: Path | None = None):
        self.control = control
        self.origin = origin
        self.rng = random.Random(seed)
        self.store = store  # qsd: target files live here, one per live snapshot
        self.snapshots: set[str] = set()  # the model: "origin@snap" the server must have
        self.report = Report()
        self.tried: dict[str, set[str]] = {}  # method -> parameters given a hostile value
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._next = 0

    # ---- connection -------------------------------------------------------------------
    def _connect(self) -> None:
        self.close()
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(120)
        self._sock.connect(str(self.control))
        self._reader = self._sock.makefile("rb")

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None

    def _exchange(self, line: bytes, what: str) -> dict[str, Any]:
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            self._sock.sendall(line)
            answer = self._reader.readline(4 * LINE_LIMIT)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        if len(line) > LINE_LIMIT:  # the server says so and hangs up
            self.report.reconnects += 1
            self.close()
        if not answer.endswith(b"\n"):
            raise FuzzFailure(f"no response line to {what}: {answer[:200]!r}")
        try:
            response = json.loads(answer)
        except ValueError:
            raise FuzzFailure(f"response to {what} is not JSON: {answer[:200]!r}") from None
        if not isinstance(response, dict) or ("result" in response) == ("error" in response):
            raise FuzzFailure(f"malformed response to {what}: {answer[:200]!r}")
        return response

    # ---- requests -------------------------------------------------------------------------
    def call(self, method: str, params: Any, *, raw_id: Any = None) -> dict[str, Any]:
        """Send one request (``params`` as given, hostile or not) and check the response."""
        self._next += 1
        req_id = self._next if raw_id is None else raw_id
        request = {"id": req_id, "method": method, "params": params}
        line = json.dumps(request).encode() + b"\n"
        what = _short(line)
        response = self._exchange(line, what)
        if response.get("id") != req_id:
            raise FuzzFailure(f"response to {what} has id {response.get('id')!r}")
        self._account(response, what)
        return response

    def raw(self, line: bytes) -> dict[str, Any]:
        what = _short(line)
        response = self._exchange(line, what)
        self._account(response, what)
        return response

    def _account(self, response: dict[str, Any], what: str) -> None:
        self.report.requests += 1
        if "result" in response:
            self.report.results += 1
            return
        self.report.errors += 1
        error = response["error"]
        if not isinstance(error, dict) or set(error) != {"type", "message"}:
            raise FuzzFailure(f"malformed error for {what}: {error!r}")
        kind, message = error["type"], error["message"]
        self.report.error_types[str(kind)] += 1
        if kind not in GOOD_ERROR_TYPES:
            raise FuzzFailure(f"{kind} for {what}: {_short(str(message).encode())}")
        if not isinstance(message, str) or not message or "\n" in message or len(message) > 400:
            raise FuzzFailure(f"bad error message for {what}: {_short(repr(message).encode())}")

    # ---- the model ----------------------------------------------------------------------
    def check_model(self) -> None:
        """The server's snapshots are exactly the model's; it still answers."""
        self.report.checks += 1
        listed = self.call("list_snapshots", {})["result"]
        names = {s["name"] for s in listed}
        if names != self.snapshots:
            raise FuzzFailure(
                f"snapshots {sorted(names)} but the model says "
                f"{sorted(self.snapshots)}: a request half-created or "
                "half-dropped one"
            )
        if self.store is not None:
            targets = {p.name.removesuffix(".qsd.qcow2") for p in self.store.glob("*.qsd.qcow2")}
            if targets != names:
                raise FuzzFailure(f"store targets {sorted(targets)} for snapshots {sorted(names)}")
        if self.call("ping", {})["result"].get("pid") is None:
            raise FuzzFailure("ping has no pid")

    def _valid(self, param: Param, i: int) -> Any:
        if param.name == "origin":
            return self.origin
        if param.name == "snap":
            return "keep" if self.rng.random() < 0.5 else f"f{i}"
        if param.choices:
            return self.rng.choice(param.choices)
        if param.kind is bool:
            return self.rng.random() < 0.5
        if param.kind is int:
            return self.rng.choice([0, BLOCK, 2 * BLOCK, 1 << 20])
        return "x"

    def _hostile(self) -> Any:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(HOSTILE)
        if r < 0.75:
            return self.rng.choice([-1, 1]) * self.rng.randrange(0, 2**70)
        if r < 0.9:
            alphabet = "ab :?#[]!$&'()*+,;=%@/\\\t\n\x00é日\u200b\ud800"
            return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(0, 120)))
        depth = self.rng.randrange(1, 6)
        value: Any = self.rng.choice(HOSTILE)
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"k": value}
        return value

    def one(self, i: int) -> None:
        """One fuzzed request (and what the model learns from its answer)."""
        r = self.rng.random()
        if r < 0.05:
            self.raw(self.rng.choice(RAW_LINES))
            return
        if r < 0.06:
            self.raw(b'{"id": 1, "method": "ping", "pad": "' + b"x" * LINE_LIMIT + b'"}\n')
            return
        name = self.rng.choice(sorted(METHODS))
        if r < 0.1:
            name = self.rng.choice(["", "Ping", "ping ", "__init__", "exports\n", "x" * 1000])
        method = METHODS.get(name)
        specs = method.params if method is not None else ()
        params: dict[str, Any] = {p.name: self._valid(p, i) for p in specs}
        mutation = self.rng.random()
        self.tried.setdefault(name, set())
        if specs and mutation < 0.7:
            target = self.rng.choice(specs)
            params[target.name] = self._hostile()
            self.tried[name].add(target.name)
        elif specs and mutation < 0.8:
            del params[self.rng.choice(specs).name]
        elif mutation < 0.9:
            params[self.rng.choice(["x", "", "origin ", "snap\x00", "Origin"])] = self._hostile()
        body: Any = params
        if self.rng.random() < 0.03:
            body = self._hostile()  # params not an object at all
        # odd ids: the server echoes whatever id it got
        raw_id = self.rng.choice(ODD_IDS) if self.rng.random() < 0.05 else None
        response = self.call(name, body, raw_id=raw_id)
        self._learn(name, body, response)

    def _learn(self, name: str, params: Any, response: dict[str, Any]) -> None:
        if "result" not in response or not isinstance(params, dict):
            return
        if name == "create_snapshot":
            self.snapshots.add(f"{params['origin']}@{params['snap']}")
            # keep the server small: drop what was created, unless it is "keep"
            if params["snap"] != "keep":
                self.call("drop_snapshot", {"origin": params["origin"], "snap": params["snap"]})
                self.snapshots.discard(f"{params['origin']}@{params['snap']}")
        elif name == "drop_snapshot":
            self.snapshots.discard(f"{params['origin']}@{params['snap']}")

    def run(self, requests: int, check_every: int = 50) -> Report:
        start = time.monotonic()
        created = self.call("create_snapshot", {"origin": self.origin, "snap": "keep"})
        if "result" in created:
            self.snapshots.add(f"{self.origin}@keep")
        for i in range(requests):
            self.one(i)
            if i % check_every == check_every - 1:
                self.check_model()
                if f"{self.origin}@keep" not in self.snapshots:
                    self.call("create_snapshot", {"origin": self.origin, "snap": "keep"})
                    self.snapshots.add(f"{self.origin}@keep")
        self.check_model()
        self.report.seconds = time.monotonic() - start
        self.close()
        return self.report


def _short(line: bytes) -> str:
    text = line[:160].decode("utf-8", "replace").rstrip("\n")
    return text + (f"... ({len(line)} bytes)" if len(line) > 160 else "")
