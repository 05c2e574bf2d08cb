"""The native backend: snapimg's own engine behind snapimg's own NBD server.

Every origin is an export backed by ``Engine.origin_device`` (copy-before-write on
every write); every snapshot is an export ``NAME@SNAP`` backed by
``Engine.snapshot_device``.  Engine calls block, so they run in worker threads.
"""

from __future__ import annotations

import asyncio
import ssl

from snapimg.backends.base import ExportInfo
from snapimg.backends.config import ServeConfig
from snapimg.engine import Engine
from snapimg.errors import SnapshotError, UsageError
from snapimg.names import check_snapshot_name
from snapimg.nbd.exports import ExportTable
from snapimg.nbd.server import NbdServer
from snapimg.snapinfo import OnFull, SnapshotInfo
from snapimg.units import check_bytes, check_max_size, format_size


def tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load TLS certificate/key: {err}") from None
    return ctx


class NativeBackend:
    def __init__(self, config: ServeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.datapath = engine.datapath  # "compiled" or "python"
        self.table = ExportTable()
        self.server = NbdServer(self.table, tls=tls_context(config))

    async def _listen(self) -> None:
        for name in self.config.origins:
            self.table.add(name, self.engine.origin_device(name), f"origin {name}")
        for info in self.engine.snapshots():
            self._add_snapshot_export(info)
        await self.server.listen_unix(self.config.socket)
        if self.config.tcp is not None:
            await self.server.listen_tcp(*self.config.tcp)

    def _add_snapshot_export(self, info: SnapshotInfo) -> None:
        device = self.engine.snapshot_device(info.origin, info.snap)
        self.table.add(info.name, device, f"snapshot {info.snap} of {info.origin}")

    def _check_origin(self, origin: str) -> None:
        if origin not in self.config.origins:
            raise SnapshotError(
                f"unknown export {origin!r} (origins: {', '.join(self.config.origins)})"
            )

    async def exports(self) -> list[ExportInfo]:
        out = []
        for name in self.table.names():
            export = self.table.get(name)
            assert export is not None
            dev = export.device
            out.append(ExportInfo(name, dev.size, dev.read_only, self.config.uri(name)))
        return out

    async def create_snapshot(
        self, origin: str, snap: str, *, max_size: int | None, writable: bool, on_full: OnFull
    ) -> SnapshotInfo:
        self._check_origin(origin)
        check_snapshot_name(snap)
        if max_size is not None:
            check_max_size(max_size, self.engine.block_size)
        if f"{origin}@{snap}" in self.table:
            raise SnapshotError(f"snapshot {origin}@{snap} exists")
        info = await asyncio.to_thread(
            self.engine.create_snapshot,
            origin,
            snap,
            max_size=max_size,
            writable=writable,
            on_full=on_full,
        )
        self._add_snapshot_export(info)
        return info

    async def drop_snapshot(self, origin: str, snap: str) -> None:
        self._check_origin(origin)
        self.table.remove(f"{origin}@{snap}")  # cuts the clients still reading it
        await asyncio.to_thread(self.engine.drop_snapshot, origin, snap)

    async def list_snapshots(self) -> list[SnapshotInfo]:
        return await asyncio.to_thread(self.engine.snapshots)

    async def release(self, origin: str, snap: str, offset: int, length: int) -> tuple[int, int]:
        self._check_origin(origin)
        export = self.table.get(f"{origin}@{snap}")
        if export is None:
            raise SnapshotError(f"unknown snapshot {origin}@{snap}")
        check_bytes(offset, "offset")
        check_bytes(length, "length")
        size, bs = export.device.size, self.engine.block_size
        if offset + length > size:
            raise UsageError(
                f"range {offset}+{length} runs past the end of {origin}@{snap} ({size} bytes)"
            )
        start = -(-offset // bs) * bs
        end = size if offset + length == size else (offset + length) // bs * bs
        if end <= start:
            raise UsageError(
                f"range {offset}+{length} covers no whole block of {format_size(bs)}: "
                "nothing released (release frees whole blocks only)"
            )
        await asyncio.to_thread(export.device.trim, offset, length)
        return start, end - start

    async def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        self._check_origin(origin)
        return await asyncio.to_thread(self.engine.changed_ranges, origin, snap)

    async def close(self) -> None:
        await self.server.close()
        await asyncio.to_thread(self.engine.flush)
        await asyncio.to_thread(self.engine.close)


async def start(config: ServeConfig) -> NativeBackend:
    engine = await asyncio.to_thread(
        Engine.open,
        config.store_dir,
        dict(config.origins),
        block_size=config.block_size,
        durability=config.durability,
        cbw_timeout=config.cbw_timeout,
    )
    backend = NativeBackend(config, engine)
    try:
        await backend._listen()
    except BaseException:
        await backend.server.close()
        await asyncio.to_thread(engine.close)
        raise
    return backend
