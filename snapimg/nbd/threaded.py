"""The transmission phase of a plain socket connection, in a thread of its own.

After the asyncio handshake the connection's socket is taken off the event loop and
served by one thread with blocking I/O: read a request (payloads straight into their
own buffer), execute it on the device, send the reply with one ``sendmsg``.  The GIL
is released in every socket and file call, so connections run in parallel; a slow
device call or a client that stops reading holds back only its own connection, and a
vanished client ends its thread.  Requests of one connection are served in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable

from snapimg.nbd import protocol as p
from snapimg.nbd.requests import Buffers, Context, Request, error_reply, serve_request

log = logging.getLogger(__name__)
WORKERS = int(os.environ.get("SNAPIMG_NBD_WORKERS", "4"))


class _Closed(Exception):
    """The client closed the connection or the server cut it."""


class ThreadedTransmission:
    def __init__(
        self,
        sock: socket.socket,
        leftover: bytes,
        ctx: Context,
        on_finish: Callable[[], None],
        workers: int = WORKERS,
    ) -> None:
        self.sock = sock
        self.on_finish = on_finish
        self.workers = workers
        self.queue: queue.Queue[tuple[Request, bytearray | None] | None] = queue.Queue(
            maxsize=2 * workers
        )
        self.send_lock = threading.Lock()
        self.pending = memoryview(leftover)  # bytes the event loop had already read
        self.ctx = ctx
        self.thread = threading.Thread(target=self._run, name="nbd-conn", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop reading requests: the thread ends after replying to the one it serves."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def _run(self) -> None:
        threads = [
            threading.Thread(target=self._work, name="nbd-worker", daemon=True)
            for _ in range(self.workers)
        ]
        for t in threads:
            t.start()
        try:
            self._serve()
        except (_Closed, ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("NBD connection failed")
        finally:
            for _ in threads:
                self.queue.put(None)
            for t in threads:
                t.join()
            self.sock.close()
            self.on_finish()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            req, payload = item
            reply = serve_request(self.ctx, req, payload)
            with contextlib.suppress(OSError):
                self._send(reply)

    def _serve(self) -> None:
        header = bytearray(p.REQUEST.size)
        while True:
            self._recv_into(memoryview(header))
            magic, *fields = p.REQUEST.unpack(header)
            req = Request(*fields)
            if magic != p.NBD_REQUEST_MAGIC:
                log.warning("bad request magic %#x: disconnecting", magic)
                return
            if req.cmd == p.NBD_CMD_DISC:
                return
            payload: bytearray | None = None
            if req.cmd == p.NBD_CMD_WRITE:
                if req.length > p.MAX_PAYLOAD:
                    self._discard(req.length)
                    self._send(
                        error_reply(self.ctx.structured, req, p.NBD_EINVAL, "payload over 32 MiB")
                    )
                    continue
                payload = bytearray(req.length)
                self._recv_into(memoryview(payload))
            if self.workers:
                self.queue.put((req, payload))
            else:
                self._send(serve_request(self.ctx, req, payload))

    def _recv_into(self, buf: memoryview) -> None:
        if self.pending:
            n = min(len(buf), len(self.pending))
            buf[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            buf = buf[n:]
        while buf:
            n = self.sock.recv_into(buf)
            if n == 0:
                raise _Closed()
            buf = buf[n:]

    def _discard(self, length: int) -> None:
        scratch = memoryview(bytearray(min(length, 1 << 20)))
        while length:
            n = min(length, len(scratch))
            self._recv_into(scratch[:n])
            length -= n

    def _send(self, buffers: Buffers) -> None:
        with self.send_lock:
            self._send_locked(buffers)

    def _send_locked(self, buffers: Buffers) -> None:
        views = [memoryview(b) for b in buffers if len(b)]
        while views:
            n = self.sock.sendmsg(views)
            while n:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
