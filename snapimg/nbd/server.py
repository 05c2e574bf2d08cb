"""The asyncio NBD server: listeners, connections, shutdown.

One :class:`NbdServer` serves an :class:`~snapimg.nbd.exports.ExportTable` on any
number of unix sockets (created mode 0600) and TCP addresses.  With a TLS context,
TCP connections must upgrade with NBD_OPT_STARTTLS before anything else (FORCEDTLS);
unix socket connections, already limited to the owner by the socket's mode, need not.
Each connection runs the fixed newstyle handshake (:mod:`snapimg.nbd.handshake`) and
then the transmission phase (:mod:`snapimg.nbd.transmission`).  Device calls run in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from snapimg.errors import UsageError
from snapimg.nbd.compiled import CompiledTransmission
from snapimg.nbd.exports import ExportTable
from snapimg.nbd.handshake import Session, negotiate
from snapimg.nbd.requests import Context
from snapimg.nbd.threaded import ThreadedTransmission
from snapimg.nbd.transmission import Transmission
from snapimg.sockpath import prepare_unix_socket_path

log = logging.getLogger(__name__)

PlainConnection = ThreadedTransmission | CompiledTransmission  # transmission without TLS
_STREAM_LIMIT = 4 << 20  # StreamReader buffer high-water mark: whole 1 MiB writes at once
_SOCKET_BUFFER = 4 << 20  # SO_SNDBUF of served connections


class NbdServer:
    """Serves an export table on listeners added by :meth:`listen_unix` and
    :meth:`listen_tcp` until :meth:`close`.

    A connection's failures never reach the caller: a client that breaks the protocol
    or goes away ends its own connection (logged at debug level), anything else is
    logged with its traceback, and device errors become NBD error replies
    (:mod:`snapimg.nbd.requests`).  Only the listening calls raise.
    """

    def __init__(
        self,
        exports: ExportTable,
        *,
        tls: ssl.SSLContext | None = None,
        workers: int = 16,
        max_in_flight: int = 64,
    ) -> None:
        self.exports = exports
        self.tls = tls
        self.max_in_flight = max_in_flight
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._conns: dict[asyncio.Task[None], Session] = {}
        self._threaded: dict[asyncio.Task[None], PlainConnection] = {}
        exports.on_removal(self.disconnect_export)

    async def listen_unix(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (created mode 0600).  Raises
        :class:`UsageError` for a path that cannot become a socket or a socket another
        server listens on (:func:`~snapimg.sockpath.prepare_unix_socket_path`), and
        :class:`OSError` should creating it fail all the same."""
        prepare_unix_socket_path(path)
        old = os.umask(0o177)  # the socket is born mode 0600
        try:
            server = await asyncio.start_unix_server(
                functools.partial(self._accept, tls=None), path=str(path), limit=_STREAM_LIMIT
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append(server)
        self._unix_paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (port 0: any, see :meth:`tcp_ports`); TLS is
        required there when the server has a context.  Raises :class:`UsageError` when
        the address cannot be listened on."""
        try:
            server = await asyncio.start_server(
                functools.partial(self._accept, tls=self.tls),
                host=host,
                port=port,
                limit=_STREAM_LIMIT,
                reuse_address=True,
            )
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}") from None
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._servers.append(server)

    def tcp_ports(self) -> list[int]:
        """The TCP ports listened on; raises nothing."""
        ports = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    ports.append(int(sock.getsockname()[1]))
        return ports

    async def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLContext | None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = Session(reader, writer)
        self._conns[task] = session
        try:
            if await negotiate(session, self.exports, tls) is None:
                return
            if session.tls_active:
                await Transmission(session, self.executor, self.max_in_flight).run()
            else:
                await self._run_threaded(session, task)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as err:
            log.debug("connection ended: %s", err)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _run_threaded(self, session: Session, task: asyncio.Task[None]) -> None:
        """Take the socket off the event loop and serve it from a thread of its own."""
        assert session.export is not None
        transport = cast(asyncio.Transport, session.writer.transport)
        transport.pause_reading()
        leftover = bytes(session.reader._buffer)  # type: ignore[attr-defined]  # read ahead
        fd = os.dup(transport.get_extra_info("socket").fileno())
        transport.abort()
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        # Room for several whole read replies in the kernel: fewer wakeups per MiB
        # (the kernel caps it at net.core.wmem_max; unix sockets count on the sender).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def finished() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(resolve)

        ctx = Context(session.export.device, session.structured, session.base_allocation)
        conn: PlainConnection
        if getattr(ctx.dev, "compiled", None) is not None:
            conn = CompiledTransmission(sock, leftover, ctx, finished)
        else:
            conn = ThreadedTransmission(sock, leftover, ctx, finished)
        self._threaded[task] = conn
        try:
            conn.start()
            await asyncio.shield(done)
        finally:
            self._threaded.pop(task, None)

    def disconnect_export(self, name: str) -> None:
        """Cut every connection using export ``name`` (it was removed); raises nothing."""
        for task, session in list(self._conns.items()):
            if session.export is not None and session.export.name == name:
                session.writer.transport.abort()
                if task in self._threaded:
                    self._threaded[task].stop()

    async def close(self) -> None:
        """Stop listening and end every connection: requests already read complete on
        their device and are answered if the client reads the reply within 5 s, then
        the connections are cut; the unix sockets are removed.  Raises nothing."""
        for server in self._servers:
            server.close()
        for task, session in list(self._conns.items()):
            # Closing ends the reading loops; requests already read still complete
            # on the device (and get their reply) before the connection task returns.
            session.writer.transport.close()
            if task in self._threaded:
                self._threaded[task].stop()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=5)
        for conn in list(self._threaded.values()):
            conn.stop(hard=True)  # replies nobody reads: unblock their senders
        for session in list(self._conns.values()):
            session.writer.transport.abort()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=30)
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.executor.shutdown(wait=True)
