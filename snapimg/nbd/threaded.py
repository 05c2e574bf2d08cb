"""The transmission phase of a plain socket connection, served by threads of its own.

After the asyncio handshake the connection's socket is taken off the event loop and
served by a few threads of this connection in turn ("leader/followers"): the thread
holding the read turn receives one request (:class:`~snapimg.nbd.sockio.Input`),
passes the turn to the next idle thread and then executes the request itself and
sends its reply (:class:`~snapimg.nbd.sockio.Output`).  A request thus never waits
for a hand-off to another thread, which is what a client at queue depth 1 (a BIOS,
DOS) pays per request; several requests still run at once, and their replies go out
of order when one is slower than the next.  Every socket and file call releases the
GIL, so connections run in parallel; a slow device call or a client that stops
reading holds back only its own connection (once every thread is busy nobody
reads), and a vanished client ends its threads.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from snapimg.nbd import protocol as p
from snapimg.nbd.requests import Context, Request, parse_header, refuse_payload, serve_request
from snapimg.nbd.sockio import Closed, Input, Output, stop_reading

log = logging.getLogger(__name__)
THREADS = 6  # per connection: requests read and not yet answered, at most


class ThreadedTransmission:
    def __init__(
        self,
        sock: socket.socket,
        leftover: bytes,
        ctx: Context,
        on_finish: Callable[[], None],
        threads: int = THREADS,
    ) -> None:
        self.sock = sock
        self.input = Input(sock, leftover)
        self.output = Output(sock)
        self.ctx = ctx
        self.on_finish = on_finish
        self.read_turn = threading.Lock()  # held by the one thread receiving a request
        self.done = False  # no more requests: set by the thread that found the end
        self.state = threading.Lock()
        self.running = threads
        self.threads = [
            threading.Thread(target=self._run, name="nbd-conn", daemon=True) for _ in range(threads)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, hard: bool = False) -> None:
        """Stop reading requests: the threads end after replying to those already read
        (``hard``: and stop sending too, the client is not reading)."""
        stop_reading(self.sock, hard)

    def _run(self) -> None:
        try:
            while (item := self._next_request()) is not None:
                req, payload = item
                reply = serve_request(self.ctx, req, payload)
                try:
                    self.output.send(reply)
                except OSError:
                    self.stop()  # the client is gone: let the reading thread end too
        except Exception:
            log.exception("NBD connection failed")
            self.done = True
            self.stop()
        finally:
            with self.state:
                self.running -= 1
                last = self.running == 0
            if last:
                self.sock.close()
                self.on_finish()

    def _next_request(self) -> tuple[Request, bytes | bytearray | None] | None:
        """Take the read turn, receive one request, pass the turn on; None: the end."""
        with self.read_turn:
            while not self.done:
                try:
                    item = self._read_request()
                except (Closed, OSError):
                    item = None
                if item is None:
                    self.done = True
                elif item[0] is not None:
                    return item[0], item[1]
        return None

    def _read_request(self) -> tuple[Request | None, bytes | bytearray | None] | None:
        """One request and its payload; (None, None): answered here; None: the end."""
        req = parse_header(self.input.read(p.REQUEST.size))
        if req is None:
            return None
        if req.cmd != p.NBD_CMD_WRITE:
            return req, None
        refused = refuse_payload(self.ctx, req)
        if refused is not None:
            self.input.skip(req.length)
            self.output.send(refused)
            return None, None
        return req, self.input.read_large(req.length)
