"""The transmission phase of a plain socket connection, served in C.

After the asyncio handshake the connection's socket is handed to the device's
compiled data path (``device.compiled.serve``, :mod:`snapimg.engine.compiled`), which
receives requests, executes them and sends replies without the GIL, on a few threads
of this connection (leader/followers, like :mod:`snapimg.nbd.threaded`).  Request
checks and error values are those of :mod:`snapimg.nbd.requests`, whose
:func:`~snapimg.nbd.requests.describe_error` turns an exception raised by a Python
slow path into the reply's error.  TLS connections stay on the Python transmission
(:mod:`snapimg.nbd.transmission`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from snapimg.nbd.requests import Context, describe_error
from snapimg.nbd.sockio import stop_reading

if TYPE_CHECKING:
    from snapimg._datapath import Device

log = logging.getLogger(__name__)
THREADS = int(os.environ.get("SNAPIMG_NBD_THREADS", "4"))  # per connection


class CompiledTransmission:
    def __init__(
        self,
        sock: socket.socket,
        leftover: bytes,
        ctx: Context,
        on_finish: Callable[[], None],
        threads: int = THREADS,
    ) -> None:
        self.sock = sock
        self.leftover = leftover
        self.ctx = ctx
        self.on_finish = on_finish
        self.threads = threads
        self.device: Device = getattr(ctx.dev, "compiled")  # noqa: B009
        self.thread = threading.Thread(target=self._run, name="nbd-conn", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, hard: bool = False) -> None:
        """Stop reading requests: the threads end after replying to those already read
        (``hard``: and stop sending too, the client is not reading)."""
        stop_reading(self.sock, hard)

    def _run(self) -> None:
        try:
            why = self.device.serve(
                self.sock.fileno(),
                self.leftover,
                self.ctx.structured,
                self.ctx.base_allocation,
                describe_error,
                self.threads,
            )
            if why:
                log.warning("%s", why)
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self.sock.close()
            self.on_finish()
