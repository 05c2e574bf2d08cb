"""Runs an NbdServer on its own event loop thread for tests (unix socket in a tmp dir)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from snapimg.blockdev import BlockDevice
from snapimg.nbd.exports import ExportTable
from snapimg.nbd.server import NbdServer


class ServerThread:
    def __init__(self, exports: ExportTable, sock: Path) -> None:
        self.exports = exports
        self.sock = sock
        import os as _os

        if _os.environ.get("UV"):
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.server = NbdServer(exports)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.call(self.server.listen_unix(self.sock))

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def run(self, fn: object, *args: object) -> None:
        async def wrapper() -> None:
            fn(*args)  # type: ignore[operator]

        self.call(wrapper())

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def serving(devices: dict[str, BlockDevice], sock: Path) -> Iterator[ServerThread]:
    exports = ExportTable()
    for name, dev in devices.items():
        exports.add(name, dev, f"test export {name}")
    st = ServerThread(exports, sock)
    st.start()
    try:
        yield st
    finally:
        st.stop()


def many_clients(connect: Callable[[], Any], count: int = 48) -> None:
    """``count`` clients at once, each writing and reading back its own 64 KiB five times;
    then one client checks every region (the byte written last in it)."""
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            h = connect()
            data = bytes([i + 1]) * 65536
            for _ in range(5):
                h.pwrite(data, i * 65536)
                assert h.pread(65536, i * 65536) == data
            h.shutdown()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    h = connect()
    for i in range(count):
        assert h.pread(1, i * 65536 + 65535) == bytes([i + 1])
    h.shutdown()
