"""The transmission phase of a plain socket connection, served by threads of its own.

After the asyncio handshake the connection's socket is taken off the event loop.  A
reader thread receives requests (:class:`~snapimg.nbd.sockio.Input`) and queues them
to a few worker threads of this connection, which execute them on the device and
send the replies (:class:`~snapimg.nbd.sockio.Output`), out of order when one request
is slower than the next.  Every socket and file call releases the GIL, so connections
run in parallel; a slow device call or a client that stops reading holds back only
its own connection (the reader stops once its queue is full), and a vanished client
ends its threads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable

from snapimg.nbd import protocol as p
from snapimg.nbd.requests import Context, Request, error_reply, serve_request
from snapimg.nbd.sockio import Closed, Input, Output

log = logging.getLogger(__name__)
WORKERS = 4  # per connection
_Item = tuple[Request, bytes | bytearray | None] | None


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
        self.input = Input(sock, leftover)
        self.output = Output(sock)
        self.ctx = ctx
        self.on_finish = on_finish
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.slots = threading.Semaphore(2 * workers)  # requests read, not yet answered
        self.workers = [
            threading.Thread(target=self._work, name="nbd-worker", daemon=True)
            for _ in range(workers)
        ]
        self.reader = threading.Thread(target=self._run, name="nbd-reader", daemon=True)

    def start(self) -> None:
        for t in self.workers:
            t.start()
        self.reader.start()

    def stop(self, hard: bool = False) -> None:
        """Stop reading requests: the threads end after replying to those already read
        (``hard``: and stop sending too, the client is not reading)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR if hard else socket.SHUT_RD)

    def _run(self) -> None:
        try:
            self._read_requests()
        except (Closed, OSError):
            pass
        except Exception:
            log.exception("NBD connection failed")
        finally:
            for _ in self.workers:
                self.queue.put(None)
            for t in self.workers:
                t.join()
            self.sock.close()
            self.on_finish()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            req, payload = item
            reply = serve_request(self.ctx, req, payload)
            try:
                self.output.send(reply)
            except OSError:
                self.stop()  # the client is gone: let the reader end too
            finally:
                self.slots.release()

    def _read_requests(self) -> None:
        while True:
            magic, *fields = p.REQUEST.unpack(self.input.read(p.REQUEST.size))
            req = Request(*fields)
            if magic != p.NBD_REQUEST_MAGIC:
                log.warning("bad request magic %#x: disconnecting", magic)
                return
            if req.cmd == p.NBD_CMD_DISC:
                return
            payload: bytes | bytearray | None = None
            if req.cmd == p.NBD_CMD_WRITE:
                if req.length > p.MAX_PAYLOAD:
                    self.input.skip(req.length)
                    msg = "payload over 32 MiB"
                    self.output.send(error_reply(self.ctx.structured, req, p.NBD_EINVAL, msg))
                    continue
                payload = self.input.read_large(req.length)
            self.slots.acquire()
            self.queue.put((req, payload))
