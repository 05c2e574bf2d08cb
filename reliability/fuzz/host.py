"""What the fuzz targets run against: a real engine with a file store, its exports, and a
real NBD server on a unix socket (for the second client), all in this process.

Origins ``fuzz`` (fuzzed connections write it) and ``check`` (only the second client
writes it), 1 MiB each with data and holes; snapshots ``fuzz@s`` (read-only: fuzzed reads
of it must return its creation content however the origin is written), ``fuzz@w``
(writable) and ``check@c``.  Log records that carry a traceback or are errors are kept
in :attr:`Host.errors`: a server must never log one because of what a client sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from pathlib import Path

from snapimg.blockdev import BlockDevice
from snapimg.engine import Engine
from snapimg.nbd.exports import ExportTable
from snapimg.nbd.server import NbdServer

SIZE = 1 << 20
BLOCK = 65536
SNAPSHOTS = {"fuzz@s": False, "fuzz@w": True, "check@c": False}  # name -> writable


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(self.format(record))


def origin_content(name: str) -> bytes:
    """Data with holes: blocks 3, 4 and 9 are zero."""
    buf = bytearray(random.Random(name).randbytes(SIZE))
    for b in (3, 4, 9):
        buf[b * BLOCK : (b + 1) * BLOCK] = bytes(BLOCK)
    return bytes(buf)


class Host:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.content = {o: origin_content(o) for o in ("fuzz", "check")}
        paths = {}
        for o, data in self.content.items():
            path = workdir / f"{o}.img"
            path.write_bytes(data)
            paths[o] = path
        self.engine = Engine.open(workdir / "store", paths, BLOCK, "default")
        self.exports = ExportTable()
        for o in paths:
            self.exports.add(o, self.engine.origin_device(o))
        for name, writable in SNAPSHOTS.items():
            origin, snap = name.split("@")
            self.engine.create_snapshot(origin, snap, writable=writable)
            self.exports.add(name, self.engine.snapshot_device(origin, snap), f"snapshot {name}")
        self.sizes = {n: SIZE for n in self.exports.names()}
        self.log = _Collect()
        logging.getLogger("snapimg").addHandler(self.log)
        logging.getLogger("asyncio").addHandler(self.log)
        self.socket = workdir / "nbd.sock"
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(self.exports)
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-host", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.listen_unix(self.socket), self.loop).result(30)

    @property
    def errors(self) -> list[str]:
        return self.log.records

    def device(self, name: str) -> BlockDevice:
        export = self.exports.get(name)
        assert export is not None
        return export.device

    def snapshot_intact(self) -> str | None:
        """None when ``fuzz@s`` is valid and reads its creation content."""
        for info in self.engine.snapshots():
            if f"{info.origin}@{info.snap}" == "fuzz@s" and not info.valid:
                return f"fuzz@s became invalid: {info.reason}"
        got = self.engine.snapshot_device("fuzz", "s").pread(0, SIZE)
        return None if got == self.content["fuzz"] else "fuzz@s no longer reads its content"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.engine.close()
        logging.getLogger("snapimg").removeHandler(self.log)
        logging.getLogger("asyncio").removeHandler(self.log)
