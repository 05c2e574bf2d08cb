"""The qsd backend: snapimg's exports and snapshots carried by qemu-storage-daemon.

Implements :class:`snapimg.backends.base.Backend` on the graph of
:mod:`snapimg.backends.qsd.graph`.  Policy mapping (docs/qemu-backend.md):

- ``on_full=block-writes``: the qcow2 target sits in a raw window of fixed size and the
  filter fails the writer's request when a copy does not fit (ENOSPC,
  ``break-guest-write``); the snapshot stays exact.
- ``on_full=invalidate``: the target is not capped in QEMU (a capped copy that fails
  would leave the qcow2 export serving new origin data under ``break-snapshot``);
  snapimg invalidates the snapshot as soon as its preserved bytes pass max_size (checked
  every 0.2 s and on every list): its export, job and nodes are removed, so reads fail
  and never return wrong data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapimg.backends.base import ExportInfo
from snapimg.backends.config import ServeConfig
from snapimg.backends.qsd import graph, records
from snapimg.backends.qsd.allocation import copied_ranges
from snapimg.backends.qsd.daemon import Daemon
from snapimg.backends.qsd.graph import COPY_GRANULARITY, OriginNodes, SnapshotNodes
from snapimg.errors import QemuError, SnapshotError, UsageError
from snapimg.names import check_snapshot_name
from snapimg.nbd.uri import unix_uri
from snapimg.snapinfo import OnFull, SnapshotInfo
from snapimg.sockpath import prepare_unix_socket_path
from snapimg.units import check_max_size

WATCH_INTERVAL = 0.2
LOST_REASON = "qemu-storage-daemon stopped: qsd snapshots do not survive a restart"


@dataclass
class _Snapshot:
    info: SnapshotInfo
    nodes: SnapshotNodes | None  # None once invalid (its graph in QEMU removed)
    dead_key: str | None = None  # invalid: key of the export that answers EIO


class QsdBackend:
    def __init__(self, daemon: Daemon, socket: Path, store_dir: Path, block_size: int) -> None:
        self.daemon = daemon
        self.qmp = daemon.qmp
        self.datapath = "qemu-storage-daemon"
        self.socket = socket
        self.store_dir = store_dir
        self.cluster_size = max(block_size, COPY_GRANULARITY)
        self.origins: dict[str, OriginNodes] = {}
        self._snaps: dict[tuple[str, str], _Snapshot] = {}
        self._lock = asyncio.Lock()
        self._next_key = 0
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    # ---- helpers -------------------------------------------------------------------
    def uri(self, export: str) -> str:
        return unix_uri(export, self.socket)

    def _key(self, prefix: str) -> str:
        self._next_key += 1
        return f"{prefix}{self._next_key}"

    def _origin(self, name: str) -> OriginNodes:
        try:
            return self.origins[name]
        except KeyError:
            raise SnapshotError(f"unknown export {name!r}") from None

    def _snap(self, origin: str, snap: str) -> _Snapshot:
        try:
            return self._snaps[(origin, snap)]
        except KeyError:
            raise SnapshotError(f"unknown snapshot {origin}@{snap}") from None

    def _save(self) -> None:
        targets = {s.info.name: s.nodes.target_path.name for s in self._snaps.values() if s.nodes}
        records.save(self.store_dir, [s.info for s in self._snaps.values()], targets)

    def _check_alive(self) -> None:
        if self.daemon.dead:
            raise QemuError(f"qemu-storage-daemon (pid {self.daemon.pid}) is not running")

    def node_names_of(self, origin: str, snap: str) -> set[str]:
        """The QEMU block nodes a live snapshot holds (empty once invalid)."""
        nodes = self._snap(origin, snap).nodes
        return set(nodes.node_names()) if nodes else set()

    async def died(self) -> str:
        """Completes with a one-line reason if qemu-storage-daemon dies unexpectedly."""
        return await self.daemon.died()

    # ---- setup ---------------------------------------------------------------------
    async def _setup(self, origins: dict[str, Path]) -> None:
        for name, path in origins.items():
            node = OriginNodes(self._key("o"), name, path)
            await graph.add_origin(self.qmp, node)
            self.origins[name] = node
        # Snapshots of an earlier daemon are gone: say so, and remove their targets.
        for info, target in records.load(self.store_dir):
            if target is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.store_dir / target).unlink()
            if info.valid:
                info = replace(info, valid=False, reason=LOST_REASON)
            self._snaps[(info.origin, info.snap)] = _Snapshot(info, None)
            if info.origin in self.origins:
                await self._kill_export(info.origin, info.snap)
        self._save()
        self._watcher = asyncio.create_task(self._watch())

    # ---- Backend protocol ----------------------------------------------------------
    async def exports(self) -> list[ExportInfo]:
        self._check_alive()
        sizes = {
            n["node-name"]: int(n["image"]["virtual-size"])
            for n in await self.qmp.execute("query-named-block-nodes", {"flat": True})
        }
        out = [
            ExportInfo(o.name, sizes[o.top], False, self.uri(o.name)) for o in self.origins.values()
        ]
        for s in self._snaps.values():
            name = s.info.name
            if s.nodes is not None:
                out.append(ExportInfo(name, sizes[s.nodes.target], True, self.uri(name)))
            elif s.dead_key is not None:
                size = sizes[f"{s.dead_key}-dead"]
                out.append(ExportInfo(name, size, True, self.uri(name)))
        return out

    async def create_snapshot(
        self, origin: str, snap: str, *, max_size: int | None, writable: bool, on_full: OnFull
    ) -> SnapshotInfo:
        onode = self._origin(origin)
        check_snapshot_name(snap)
        if writable:
            raise UsageError("writable snapshots are not supported by the qsd backend")
        if max_size is not None:
            check_max_size(max_size, self.cluster_size)
        async with self._lock:
            self._check_alive()
            if (origin, snap) in self._snaps:
                raise SnapshotError(f"snapshot {origin}@{snap} already exists")
            size = int((await self._node(onode.fmt))["image"]["virtual-size"])
            target = self.store_dir / f"{origin}@{snap}.qsd.qcow2"
            await graph.create_qcow2(target, size, self.cluster_size)
            limit = None
            if max_size is not None and on_full == "block-writes":
                # more than the image size can never be preserved: that caps the window
                data = min(max_size, size)
                limit = _qcow2_limit(os.stat(target).st_size, size, data, self.cluster_size)
                os.truncate(target, limit)
            base = target.stat().st_blocks * 512
            nodes = SnapshotNodes(self._key("s"), f"{origin}@{snap}", target, limit, base)
            try:
                await graph.add_snapshot(self.qmp, onode.fmt, nodes)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                raise
            info = SnapshotInfo(
                origin=origin,
                snap=snap,
                created=datetime.now(UTC),
                valid=True,
                reason=None,
                preserved_blocks=0,
                preserved_bytes=0,
                max_size=max_size,
                block_size=self.cluster_size,
                writable=False,
                on_full=on_full,
            )
            self._snaps[(origin, snap)] = _Snapshot(info, nodes)
            self._save()
            return info

    async def drop_snapshot(self, origin: str, snap: str) -> None:
        async with self._lock:
            s = self._snap(origin, snap)
            if s.nodes is not None or s.dead_key is not None:
                self._check_alive()
            if s.nodes is not None:
                await self._unplug(s.nodes)
            if s.dead_key is not None:
                await graph.remove_dead_export(self.qmp, s.dead_key)
            del self._snaps[(origin, snap)]
            self._save()

    async def list_snapshots(self) -> list[SnapshotInfo]:
        async with self._lock:
            await self._refresh()
            return [s.info for s in self._snaps.values()]

    async def release(self, origin: str, snap: str, offset: int, length: int) -> tuple[int, int]:
        self._snap(origin, snap)
        raise SnapshotError(
            "release is not supported by the qsd backend (a discarded cluster of the qcow2 "
            "target would read the live origin)"
        )

    async def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        s = self._snap(origin, snap)
        if s.nodes is None:
            raise SnapshotError(f"snapshot {s.info.name} is invalid: {s.info.reason}")
        self._check_alive()
        return await asyncio.to_thread(copied_ranges, self.uri(s.info.name))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        async with self._lock:
            alive = not self.daemon.dead
            for key, s in list(self._snaps.items()):
                if s.dead_key is not None and alive:
                    with contextlib.suppress(QemuError):
                        await graph.remove_dead_export(self.qmp, s.dead_key)
                    self._snaps[key] = _Snapshot(s.info, None)
                if s.nodes is None:
                    continue
                if alive:
                    with contextlib.suppress(QemuError):
                        await self._unplug(s.nodes)
                with contextlib.suppress(FileNotFoundError):
                    s.nodes.target_path.unlink()
                self._snaps[key] = _Snapshot(replace(s.info, valid=False, reason=LOST_REASON), None)
            self._save()
            if alive:
                for onode in self.origins.values():
                    with contextlib.suppress(QemuError):
                        await graph.remove_origin(self.qmp, onode)
                with contextlib.suppress(QemuError):
                    await self.qmp.execute("nbd-server-stop")
            await self.daemon.stop()
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()

    # ---- internals -----------------------------------------------------------------
    async def _node(self, name: str) -> dict[str, Any]:
        for n in await self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if n["node-name"] == name:
                return dict(n)
        raise QemuError(f"block node {name} not found in qemu-storage-daemon")

    async def _kill_export(self, origin: str, snap: str) -> None:
        """Give invalid snapshot ``origin@snap`` an export whose reads fail with EIO."""
        size = int((await self._node(self.origins[origin].fmt))["image"]["virtual-size"])
        key = self._key("x")
        await graph.add_dead_export(self.qmp, key, f"{origin}@{snap}", size)
        self._snaps[(origin, snap)].dead_key = key

    async def _unplug(self, nodes: SnapshotNodes) -> None:
        await graph.remove_snapshot(self.qmp, nodes)
        with contextlib.suppress(FileNotFoundError):
            nodes.target_path.unlink()

    async def _refresh(self, *, counts: bool = True) -> None:
        """Invalidate snapshots whose job ended or whose target outgrew max_size (policy
        invalidate); with ``counts``, also update preserved counts (an NBD query each)."""
        if self.daemon.dead:
            return
        changed = False
        jobs = await graph.job_ids(self.qmp)
        for key, s in list(self._snaps.items()):
            if s.nodes is None:
                continue
            info, grown = s.info, s.nodes.grown_bytes()
            reason = None
            if s.nodes.job_id not in jobs:
                reason = "the QEMU fleecing job ended on its own"
            elif (
                info.on_full == "invalidate" and info.max_size is not None and grown > info.max_size
            ):
                reason = f"store full: target grew by {grown} bytes, max size {info.max_size}"
            elif counts:
                ranges = await asyncio.to_thread(copied_ranges, self.uri(info.name))
                used = sum(length for _, length in ranges)
                info = replace(
                    info, preserved_bytes=used, preserved_blocks=-(-used // self.cluster_size)
                )
            if reason is None:
                self._snaps[key] = _Snapshot(info, s.nodes)
                continue
            await self._unplug(s.nodes)
            self._snaps[key] = _Snapshot(replace(info, valid=False, reason=reason), None)
            await self._kill_export(*key)
            changed = True
        if changed:
            self._save()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not any(s.nodes for s in self._snaps.values()):
                continue
            with contextlib.suppress(QemuError, OSError):
                async with self._lock:
                    await self._refresh(counts=False)


def _qcow2_limit(initial: int, size: int, max_size: int, cluster: int) -> int:
    """Bytes of qcow2 file that hold ``max_size`` bytes of data plus the metadata for them.

    A fresh image ends inside its last metadata cluster; then come data clusters, the L2
    tables that map them and, past the first refcount block's reach, more refcount blocks.
    """
    data = -(-max_size // cluster) * cluster
    total = -(-initial // cluster) * cluster + data
    total += -(-size // (cluster * (cluster // 8))) * cluster  # L2 tables
    extra_refblocks = max(0, -(-total // (cluster * (cluster // 2))) - 1)
    return total + extra_refblocks * cluster


async def start(config: ServeConfig) -> QsdBackend:
    """Start qemu-storage-daemon serving ``config.origins`` on the NBD unix socket.

    Returns once the exports accept connections.  qemu-storage-daemon runs one NBD
    server, on the unix socket: ``--tcp`` (and so TLS) is refused with this backend.
    """
    if config.tcp is not None:
        raise UsageError("--tcp is not supported with --backend qsd (it serves one unix socket)")
    for name, path in config.origins.items():
        if not path.exists():
            raise UsageError(f"origin {name}: {path} does not exist")
    config.store_dir.mkdir(parents=True, exist_ok=True)
    prepare_unix_socket_path(config.socket)
    daemon = await Daemon.start()
    backend = QsdBackend(daemon, config.socket, config.store_dir, config.block_size)
    try:
        await daemon.qmp.execute(
            "nbd-server-start",
            {
                "addr": {"type": "unix", "data": {"path": str(config.socket)}},
            },
        )
        os.chmod(config.socket, 0o600)
        await backend._setup(config.origins)
    except BaseException:
        await backend.close()
        raise
    return backend
