"""The block-node graph snapimg builds inside QEMU, and its teardown.

One origin ``NAME`` (node names are short generated ids: QEMU allows 31 characters)::

    export NAME (rw) -> oN-top (raw) -> sK-cbw -> ... -> sJ-cbw -> oN (raw) -> oN-file
                                          |                |
                             target sK-t (qcow2)       sJ-t (qcow2)  <- export NAME@SNAP (ro)
                                  backing = oN             backing = oN

Each snapshot is a ``blockdev-backup sync=none`` job: QEMU inserts its copy-before-write
filter (``sK-cbw``) above the origin's format node ``oN``, in a drained section, so
that insertion is the snapshot's exact point in time.  The target is a qcow2 image (file
in the store dir) *backed by the origin*: QEMU's classic fleecing graph.  Reads of the
qcow2 node return copied clusters from the image and the rest from the origin, and
because the origin is in the target's backing chain QEMU serialises the copies with
reads of the target.  The ``snapshot-access`` driver is not used (QEMU 7.2 serves some
of its reads from the live origin), nor are hand-made filters inserted with
``blockdev-reopen``: stacking a second one aborts QEMU 7.2 in a drain assertion, and a
copy-before-write node cannot be reopened onto another child (docs/qemu-backend.md).
Cancelling the job removes its filter, whichever place it has in the stack.

The filter keeps QEMU's default ``on-cbw-error=break-guest-write``: a copy that fails
fails the writer's request, and the snapshot never silently diverges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snapimg.backends.qsd.qmp import JSON, Qmp
from snapimg.errors import QemuError

COPY_GRANULARITY = 64 * 1024  # block-copy never copies less than 64 KiB


@dataclass
class SnapshotNodes:
    key: str  # "s7": prefix of every node of this snapshot
    export_name: str  # "NAME@SNAP"
    target_path: Path
    limit: int | None  # byte limit of the qcow2 file (raw 'size'), None: unlimited
    base: int = 0  # disk bytes of the fresh image (header, tables)

    def grown_bytes(self) -> int:
        """Disk bytes the target file gained since creation: data clusters and L2 tables.

        Clusters preserved as zeroes take no space; this is what max-size bounds.
        """
        try:
            used = self.target_path.stat().st_blocks * 512
        except FileNotFoundError:
            return 0
        return max(0, used - self.base)

    @property
    def cbw(self) -> str:
        return f"{self.key}-cbw"

    @property
    def target(self) -> str:
        return f"{self.key}-t"

    @property
    def target_file(self) -> str:
        return f"{self.key}-tf"

    @property
    def target_limit(self) -> str:
        return f"{self.key}-tl"

    @property
    def export_id(self) -> str:
        return f"{self.key}-exp"

    @property
    def job_id(self) -> str:
        return f"{self.key}-job"

    def node_names(self) -> list[str]:
        """Every node of this snapshot, parents first (the order blockdev-del needs)."""
        names = [self.cbw, self.target]
        if self.limit is not None:
            names.append(self.target_limit)
        names.append(self.target_file)
        return names


@dataclass
class OriginNodes:
    key: str  # "o1"
    name: str  # export name
    path: Path

    @property
    def file(self) -> str:
        return f"{self.key}-file"

    @property
    def fmt(self) -> str:
        return self.key

    @property
    def top(self) -> str:
        return f"{self.key}-top"

    @property
    def export_id(self) -> str:
        return f"{self.key}-exp"

    def node_names(self) -> list[str]:
        return [self.top, self.fmt, self.file]


async def add_origin(qmp: Qmp, origin: OriginNodes) -> None:
    """Open the raw image and export it read-write as ``origin.name``."""
    added: list[str] = []
    try:
        # locking off: snapimg itself holds QEMU's locks on the image (snapimg.imagelock),
        # not sharing write as a VM does; QEMU's own NBD export would share it.
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": origin.file,
                "filename": str(origin.path),
                "locking": "off",
            },
        )
        added.append(origin.file)
        await qmp.execute("blockdev-add", _raw_opts(origin.fmt, origin.file))
        added.append(origin.fmt)
        await qmp.execute("blockdev-add", _raw_opts(origin.top, origin.fmt))
        added.append(origin.top)
        await qmp.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": origin.export_id,
                "node-name": origin.top,
                "name": origin.name,
                "writable": True,
            },
        )
    except QemuError:
        await _del_nodes(qmp, reversed(added))
        raise


async def remove_origin(qmp: Qmp, origin: OriginNodes) -> None:
    await del_export(qmp, origin.export_id)
    await _del_nodes(qmp, origin.node_names())


async def create_qcow2(path: Path, size: int, cluster_size: int) -> None:
    """A fresh qcow2 image with no backing file in its header (QMP gives it one)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"cluster_size={cluster_size}",
        str(path),
        str(size),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        msg = " ".join(out.decode(errors="replace").split())
        raise QemuError(f"qemu-img create {path} failed: {msg}")


async def add_snapshot(qmp: Qmp, device: str, snap: SnapshotNodes) -> None:
    """Start ``snap``'s fleecing job above node ``device`` and export its target read-only.

    The target image must exist (:func:`create_qcow2`).  The job start is the snapshot's
    point in time.  On failure nothing stays added.
    """
    added: list[str] = []
    try:
        await add_target(qmp, snap, backing=device)
        added = list(reversed(snap.node_names()[1:]))
        await qmp.execute(
            "blockdev-backup",
            {
                "job-id": snap.job_id,
                "device": device,
                "target": snap.target,
                "sync": "none",
                "filter-node-name": snap.cbw,
                "auto-finalize": True,
                "auto-dismiss": True,
            },
        )
        await qmp.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": snap.export_id,
                "node-name": snap.target,
                "name": snap.export_name,
                "writable": False,
                "allocation-depth": True,
            },
        )
    except QemuError:
        await cancel_job(qmp, snap.job_id)
        await _del_nodes(qmp, reversed(added))
        raise


async def add_target(qmp: Qmp, snap: SnapshotNodes, backing: str) -> None:
    """The qcow2 target node (in an optional raw size window) backed by ``backing``."""
    added: list[str] = []
    try:
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": snap.target_file,
                "filename": str(snap.target_path),
            },
        )
        added.append(snap.target_file)
        image_file = snap.target_file
        if snap.limit is not None:
            # A raw window of fixed size: writes past it fail with ENOSPC.
            await qmp.execute(
                "blockdev-add",
                {
                    "driver": "raw",
                    "node-name": snap.target_limit,
                    "file": snap.target_file,
                    "size": snap.limit,
                },
            )
            added.append(snap.target_limit)
            image_file = snap.target_limit
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": snap.target,
                "file": image_file,
                "backing": backing,
            },
        )
    except QemuError:
        await _del_nodes(qmp, reversed(added))
        raise


async def remove_snapshot(qmp: Qmp, snap: SnapshotNodes) -> None:
    """Delete ``snap``'s export, cancel its job (QEMU drops the filter), delete its nodes."""
    await del_export(qmp, snap.export_id)
    await cancel_job(qmp, snap.job_id)
    await _del_nodes(qmp, snap.node_names()[1:])


async def job_ids(qmp: Qmp) -> set[str]:
    return {j["device"] for j in await qmp.execute("query-block-jobs")}


async def cancel_job(qmp: Qmp, job_id: str, timeout: float = 10.0) -> None:
    """Cancel a fleecing job and wait until QEMU has removed it (and its filter)."""
    if job_id not in await job_ids(qmp):
        return
    await qmp.execute("block-job-cancel", {"device": job_id, "force": True})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while job_id in await job_ids(qmp):
        if loop.time() > deadline:
            raise QemuError(f"job {job_id} not gone {timeout:.0f} s after block-job-cancel")
        await asyncio.sleep(0.01)


def _raw_opts(node: str, child: str) -> JSON:
    return {"driver": "raw", "node-name": node, "file": child}


async def del_export(qmp: Qmp, export_id: str, timeout: float = 10.0) -> None:
    """Delete an export, disconnecting its clients, and wait until QEMU has let go of it."""
    if export_id not in await qmp.export_ids():
        return
    await qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while export_id in await qmp.export_ids():
        if loop.time() > deadline:
            raise QemuError(f"export {export_id} not gone {timeout:.0f} s after block-export-del")
        await asyncio.sleep(0.01)


async def _del_nodes(qmp: Qmp, names: Iterable[str]) -> None:
    present = await qmp.node_names()
    for name in names:
        if name in present:
            await qmp.execute("blockdev-del", {"node-name": name})


async def add_dead_export(qmp: Qmp, key: str, export_name: str, size: int) -> None:
    """Export ``export_name`` read-only on a node whose every read fails with EIO.

    An invalid snapshot keeps its export, as with the native backend, but serves errors,
    never data: raw -> blkdebug (inject EIO on each read) -> null-co of the origin's size.
    """
    await qmp.execute(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": f"{key}-dead",
            "read-only": True,
            "file": {
                "driver": "blkdebug",
                "node-name": f"{key}-dbg",
                "inject-error": [{"event": "read_aio", "errno": 5}],
                "image": {"driver": "null-co", "node-name": f"{key}-null", "size": size},
            },
        },
    )
    try:
        await qmp.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": f"{key}-exp",
                "node-name": f"{key}-dead",
                "name": export_name,
                "writable": False,
            },
        )
    except QemuError:
        await _del_nodes(qmp, [f"{key}-dead"])
        raise


async def remove_dead_export(qmp: Qmp, key: str) -> None:
    await del_export(qmp, f"{key}-exp")
    await _del_nodes(qmp, [f"{key}-dead"])
