"""Fuzz targets: one input in, a verdict out (an exception: :class:`FuzzFailure`).

``handshake``: byte 0 picks the configuration (bit 0: TLS required); the rest is what a
client sends from its flags on.  The real :func:`snapimg.nbd.handshake.negotiate` runs on
asyncio streams over a socketpair; it may end or raise what the server treats as a
closed connection, nothing else, answer well-formed (:func:`wire.check_handshake`), log
no error, and be done within :data:`DEADLINE`.

``transmission-python`` (``snapimg.nbd.threaded``, plain connections) and
``transmission-asyncio`` (``snapimg.nbd.transmission``, the path of TLS connections):
byte 0 picks the export (bits 0-1: ``fuzz``, read-only ``fuzz@s``, writable ``fuzz@w``),
structured replies (bit 2), ``base:allocation`` (bit 3) and how much of the stream the
handshake had read ahead (bits 4-7: 16 bytes each); the rest is the request stream.
A transmission server from :data:`TRANSMISSION_SERVERS` serves it on a socketpair:
every complete request gets one well-formed reply (:func:`wire.check_transmission`),
reads of ``fuzz@s`` return its creation content, no error is logged, the connection ends
within :data:`DEADLINE` of the stream's end.

``transmission-compiled``: the same inputs served by the C transmission
(:class:`~snapimg.nbd.compiled.CompiledTransmission`, ``Device.serve`` in
``csrc/datapath/conn.c``) over the engine's devices on the compiled data path, as the
server serves plain connections (docs/fuzzing.md builds it under ASan and UBSan).

A transmission server is a function that starts serving a connected socket (leftover
bytes, :class:`~snapimg.nbd.requests.Context`) and calls ``on_finish`` when the
connection is over; :data:`DATAPATHS` says which data path a target's engine runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from reliability.fuzz import wire
from reliability.fuzz.host import Host
from snapimg.blockdev import BlockDevice
from snapimg.nbd.compiled import CompiledTransmission
from snapimg.nbd.exports import Export
from snapimg.nbd.handshake import Session, negotiate
from snapimg.nbd.requests import Context
from snapimg.nbd.threaded import ThreadedTransmission
from snapimg.nbd.transmission import Transmission

# seconds an input may take once it was sent completely: inputs take milliseconds, a hang
# never ends; 1 s was missed under load by an input that replays in 5 ms
DEADLINE = 5.0
MAX_INPUT = 65536  # bytes: what -max_len allows (a socketpair buffers more)
CHECK_EVERY = 2000  # inputs between full checks of the host's state


class FuzzFailure(AssertionError):
    """The server misbehaved on this input."""


StartServer = Callable[[socket.socket, bytes, Context, Callable[[], None]], None]


def python_transmission(sock: socket.socket, leftover: bytes, ctx: Context,
                        on_finish: Callable[[], None]) -> None:  # fmt: skip
    """snapimg.nbd.threaded, as the server runs it (two threads instead of six: the
    leader/followers hand-off is the same, thread start-up per input is less)."""
    ThreadedTransmission(sock, leftover, ctx, on_finish, threads=2).start()


_event_loop: list[asyncio.AbstractEventLoop] = []
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fuzz-io")
_server_log = logging.getLogger("snapimg.nbd.server")


def _loop() -> asyncio.AbstractEventLoop:
    if not _event_loop:
        _event_loop.append(asyncio.new_event_loop())
        threading.Thread(target=_event_loop[0].run_forever, name="fuzz-loop", daemon=True).start()
    return _event_loop[0]


def asyncio_transmission(sock: socket.socket, leftover: bytes, ctx: Context,
                         on_finish: Callable[[], None]) -> None:  # fmt: skip
    """snapimg.nbd.transmission, the event-loop path TLS connections take (here on the
    plain socket), with the server's stream limit and an executor for device calls."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=4 << 20, loop=loop)
        reader.feed_data(leftover)  # before the socket's bytes, as after the handshake
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        export = Export("fuzzed", ctx.dev)
        session = Session(reader, writer, structured=ctx.structured, export=export,
                          meta_export=export.name if ctx.base_allocation else None)  # fmt: skip
        try:
            await Transmission(session, _executor).run()
        except Exception:
            _server_log.exception("NBD connection failed")  # what NbdServer._accept does
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            on_finish()

    asyncio.run_coroutine_threadsafe(serve(), _loop())


def compiled_transmission(sock: socket.socket, leftover: bytes, ctx: Context,
                          on_finish: Callable[[], None]) -> None:  # fmt: skip
    """snapimg.nbd.compiled, as the server runs it for a plain connection to an engine
    export on the compiled data path: the connection's threads (four) are C's."""
    CompiledTransmission(sock, leftover, ctx, on_finish).start()


TRANSMISSION_SERVERS: dict[str, StartServer] = {
    "python": python_transmission,
    "asyncio": asyncio_transmission,
    "compiled": compiled_transmission,
}
# The engine's data path per target, as the server pairs them (None: $SNAPIMG_DATAPATH,
# else compiled where built): the threaded Python transmission serves the Python data
# path, the C transmission only devices of the compiled one, TLS connections either.
DATAPATHS: dict[str, str | None] = {
    "transmission-python": "python",
    "transmission-compiled": "compiled",
    "lifecycle-compiled": "compiled",
}
EXPORTS = ("fuzz", "fuzz@s", "fuzz@w")


def exchange(sock: socket.socket, data: bytes, deadline: float) -> bytes:
    """Send ``data`` then EOF, receive until the peer closes; FuzzFailure when that takes
    longer than ``deadline`` seconds past the end of the input.  Inputs up to
    :data:`MAX_INPUT` fit the socket's buffer, so sending never waits for the server."""
    if len(data) > MAX_INPUT:
        raise ValueError(f"input of {len(data)} bytes, more than {MAX_INPUT}")
    sock.settimeout(deadline)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # server hung up early
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    out = bytearray()
    until = time.monotonic() + deadline
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            chunk = None
        if chunk is None or time.monotonic() > until:
            raise FuzzFailure(f"no end of the connection {deadline} s after the input")
        if not chunk:
            return bytes(out)
        out += chunk


class Target:
    name = ""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.inputs = 0

    def one_input(self, data: bytes) -> None:
        errors_before = len(self.host.errors)
        self.run(data)
        self.inputs += 1
        if len(self.host.errors) != errors_before:
            raise FuzzFailure(f"the server logged: {self.host.errors[errors_before]}")
        if self.inputs % CHECK_EVERY == 0 and (bad := self.host.snapshot_intact()):
            raise FuzzFailure(bad)

    def run(self, data: bytes) -> None:
        raise NotImplementedError


class HandshakeTarget(Target):
    name = "handshake"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.loop = asyncio.new_event_loop()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: handshakes fail

    def run(self, data: bytes) -> None:
        if not data:
            return
        tls = self.tls if data[0] & 1 else None
        stream = data[1:]
        ssock, csock = socket.socketpair()
        try:
            got = self.loop.run_until_complete(self._serve(ssock, csock, stream, tls))
        finally:
            ssock.close()
            csock.close()
        wire.check_handshake(stream, got, self.host.sizes)

    async def _serve(self, ssock: socket.socket, csock: socket.socket, stream: bytes,
                     tls: ssl.SSLContext | None) -> bytes:  # fmt: skip
        reader, writer = await asyncio.open_connection(sock=ssock, limit=4 << 20)
        creader, cwriter = await asyncio.open_connection(sock=csock)
        cwriter.write(stream)
        cwriter.write_eof()

        async def server() -> None:
            try:
                await negotiate(Session(reader, writer), self.host.exports, tls)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass  # the server ends such connections quietly
            finally:
                writer.close()

        try:
            async with asyncio.timeout(DEADLINE):
                got, _ = await asyncio.gather(creader.read(), server())
        except TimeoutError:
            raise FuzzFailure(f"handshake not over {DEADLINE} s after the input") from None
        finally:
            cwriter.close()
        return got


class TransmissionTarget(Target):
    def __init__(self, host: Host, server: str) -> None:
        super().__init__(host)
        self.name = f"transmission-{server}"
        self.start = TRANSMISSION_SERVERS[server]
        self.snapshot = host.content["fuzz"]

    def _check_snapshot_read(self, offset: int, data: bytes) -> str | None:
        if data != self.snapshot[offset : offset + len(data)]:
            return f"fuzz@s read at {offset} (+{len(data)}) returned other data"
        return None

    def export(self, index: int) -> tuple[BlockDevice, wire.ReadCheck | None]:
        """The device byte 0's bits 0-1 pick, and the check of what is read from it."""
        name = EXPORTS[index % 3]
        check = self._check_snapshot_read if name == "fuzz@s" else None
        return self.host.device(name), check

    def run(self, data: bytes) -> None:
        if not data:
            return
        cfg, stream = data[0], data[1:]
        device, check = self.export(cfg & 3)
        structured = bool(cfg & 4)
        ctx = Context(device, structured, structured and bool(cfg & 8))
        split = min(len(stream), (cfg >> 4) * 16)  # bytes the handshake had read ahead
        ssock, csock = socket.socketpair()
        ssock.setblocking(True)
        finished = threading.Event()
        try:
            self.start(ssock, stream[:split], ctx, finished.set)
            got = exchange(csock, stream[split:], DEADLINE)
            if not finished.wait(DEADLINE):
                raise FuzzFailure(f"server threads still running {DEADLINE} s after the end")
        finally:
            csock.close()
        wire.check_transmission(stream, got, structured, check)


def make_target(name: str, host: Host) -> Target:
    if name == "handshake":
        return HandshakeTarget(host)
    server = name.removeprefix("transmission-")
    want = DATAPATHS.get(name)
    if want is not None and host.engine.datapath != want:
        raise ValueError(f"fuzz target {name!r} needs an engine on the {want} data path, "
                         f"this host's runs on the {host.engine.datapath} one")  # fmt: skip
    if name.startswith("transmission-") and server in TRANSMISSION_SERVERS:
        return TransmissionTarget(host, server)
    if name == "lifecycle-compiled":
        from reliability.fuzz.lifecycle import LifecycleTarget  # it builds on this module

        return LifecycleTarget(host)
    known = ["handshake", *(f"transmission-{s}" for s in TRANSMISSION_SERVERS),
             "lifecycle-compiled"]  # fmt: skip
    raise ValueError(f"unknown fuzz target {name!r}: expected one of {known}")
