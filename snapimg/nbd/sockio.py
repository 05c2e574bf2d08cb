"""Buffered, thread-safe I/O on a blocking socket for the NBD transmission phase.

:class:`Input` reads requests with few ``recv`` calls: small messages come out of one
big receive buffer, large payloads are received straight into their own buffer.
:class:`Output` lets several threads send replies: whichever thread finds nobody
sending becomes the sender and flushes everything queued meanwhile with ``sendmsg``
(so replies finishing together go out in one system call); the others return at once
unless more than ``limit`` bytes are waiting for a client that does not read.
"""

from __future__ import annotations

import contextlib
import socket
import threading

_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)


def stop_reading(sock: socket.socket, hard: bool) -> None:
    """End a connection's transmission: no more requests are read (those already read
    are still answered); ``hard``: replies are not sent either (the client is not
    reading them)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR if hard else socket.SHUT_RD)


class Closed(Exception):
    """The peer closed the connection (or it was shut down)."""


class Input:
    def __init__(self, sock: socket.socket, leftover: bytes, size: int = 256 << 10) -> None:
        self.sock = sock
        self.buf = bytearray(max(size, len(leftover)))
        self.buf[: len(leftover)] = leftover
        self.start = 0
        self.end = len(leftover)

    def _fill(self, need: int) -> None:
        """Make at least ``need`` (<= buffer size) bytes available from ``start``."""
        if self.start + need > len(self.buf):
            avail = self.end - self.start
            self.buf[:avail] = self.buf[self.start : self.end]
            self.start, self.end = 0, avail
        view = memoryview(self.buf)
        while self.end - self.start < need:
            n = self.sock.recv_into(view[self.end :])
            if n == 0:
                raise Closed()
            self.end += n

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (n <= buffer size), as an independent object."""
        self._fill(n)
        data = bytes(self.buf[self.start : self.start + n])
        self.start += n
        return data

    def read_large(self, n: int) -> bytes | bytearray:
        """Exactly ``n`` bytes of any size, received mostly straight into the result."""
        if n <= len(self.buf) // 4:
            return self.read(n)
        out = bytearray(n)
        view = memoryview(out)
        have = min(n, self.end - self.start)
        view[:have] = self.buf[self.start : self.start + have]
        self.start += have
        pos = have
        while pos < n:
            got = self.sock.recv_into(view[pos:])
            if got == 0:
                raise Closed()
            pos += got
        return out

    def skip(self, n: int) -> None:
        while n:
            chunk = min(n, len(self.buf))
            self.read(chunk)
            n -= chunk


class Output:
    def __init__(self, sock: socket.socket, limit: int = 8 << 20) -> None:
        self.sock = sock
        self.limit = limit
        self.cond = threading.Condition()
        self.queued: list[memoryview] = []
        self.queued_bytes = 0
        self.sending = False
        self.broken: OSError | None = None

    def send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        """Queue one reply (its buffers stay together and in order) and see it sent."""
        views = [memoryview(b) for b in buffers if len(b)]
        with self.cond:
            if self.broken is not None:
                raise self.broken
            self.queued.extend(views)
            self.queued_bytes += sum(len(v) for v in views)
            if self.sending:
                while self.sending and self.queued_bytes > self.limit and not self.broken:
                    self.cond.wait()
                return
            self.sending = True
        self._flush()

    def _flush(self) -> None:
        while True:
            with self.cond:
                batch, self.queued = self.queued, []
                self.queued_bytes = 0
                if not batch:
                    self.sending = False
                    self.cond.notify_all()
                    return
                self.cond.notify_all()  # room again for waiting senders
            try:
                self._send_all(batch)
            except OSError as err:
                with self.cond:
                    self.broken = err
                    self.sending = False
                    self.queued.clear()
                    self.cond.notify_all()
                raise

    def _send_all(self, views: list[memoryview]) -> None:
        i = 0
        while i < len(views):
            n = self.sock.sendmsg(views[i : i + _IOV_MAX])
            while n:
                if n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0
