"""The transmission phase on asyncio streams (used for TLS connections).

Every request becomes its own task; :func:`~snapimg.nbd.requests.serve_request` runs in
the server's thread pool, so a slow device call or a client that does not read its
replies only holds back that client.  Replies go out as soon as their request is done
(out of order, matched by handle).  At most ``max_in_flight`` requests per connection
are processed at once; beyond that the connection stops reading.
Plain (non-TLS) connections use the faster :mod:`snapimg.nbd.threaded` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor

from snapimg.nbd import protocol as p
from snapimg.nbd.handshake import Session
from snapimg.nbd.requests import Context, Request, parse_header, refuse_payload, serve_request


class Transmission:
    def __init__(self, session: Session, executor: Executor, max_in_flight: int = 64) -> None:
        assert session.export is not None
        self.s = session
        self.ctx = Context(session.export.device, session.structured, session.base_allocation)
        self.executor = executor
        self.slots = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve requests until NBD_CMD_DISC or the client goes away; then wait for
        the requests in flight (their device calls complete either way)."""
        r = self.s.reader
        try:
            while True:
                req = parse_header(await r.readexactly(p.REQUEST.size))
                if req is None:
                    return
                payload: bytes | None = None
                if req.cmd == p.NBD_CMD_WRITE:
                    refused = refuse_payload(self.ctx, req)
                    if refused is not None:
                        await self._discard(req.length)
                        self._send(refused)
                        continue
                    payload = await r.readexactly(req.length)
                await self.slots.acquire()
                task = self.loop.create_task(self._handle(req, payload))
                self.tasks.add(task)
                task.add_done_callback(self._done)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def _discard(self, length: int) -> None:
        while length:
            n = min(length, 1 << 20)
            await self.s.reader.readexactly(n)
            length -= n

    async def _handle(self, req: Request, payload: bytes | None) -> None:
        reply = await self.loop.run_in_executor(
            self.executor, serve_request, self.ctx, req, payload
        )
        self._send(reply)
        with contextlib.suppress(ConnectionError):
            await self.s.writer.drain()

    def _send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        for buf in buffers:  # no await in between: one reply is never interleaved
            self.s.writer.write(buf)
