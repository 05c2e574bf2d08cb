"""Snapshots of a disk of an already-running QEMU, taken over its QMP socket.

The guest's writes never pass through snapimg: QEMU itself does the copy-before-write.
``attach`` starts a ``blockdev-backup sync=none`` job on the disk's root node (QEMU
inserts the copy-before-write filter between the device and its node, in a drained
section: the snapshot's point in time) whose target is a qcow2 image in the store dir
backed by that node, then exports the qcow2 node read-only over QEMU's own NBD server on
a unix socket.  ``detach`` removes the export, cancels the job (QEMU removes the filter)
and deletes the nodes and the target file, leaving the device on its original node.

Route per device type, measured on QEMU 7.2 (docs/qemu-backend.md): the backup job works
the same for ide-hd, scsi-hd on lsi53c895a and scsi-hd on virtio-scsi because it swaps
the node under the device's BlockBackend without involving the device model.
``blockdev-reopen`` of the format node onto a filter aborts 7.2 (drain assertion) and
``qom-set drive`` cannot stack a second snapshot, so neither is used.

A second snapshot of the same disk starts its job on the disk's own node, found below the
filters already there with ``x-debug-query-block-graph``.

Everything snapimg adds is named from a hash of ``NAME@SNAP``, so ``detach`` finds it
from QEMU alone.  The NBD server snapimg starts is marked by an ``authz-simple`` object
(id ``snapimg-nbd``) whose ``identity`` holds the socket path; the last ``detach``
stops that server, never one snapimg did not start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from snapimg.backends.qsd import graph
from snapimg.backends.qsd.graph import COPY_GRANULARITY, SnapshotNodes
from snapimg.backends.qsd.qmp import Qmp
from snapimg.errors import QemuError, SnapshotError, UsageError
from snapimg.names import split_snapshot_name
from snapimg.nbd.uri import unix_uri

NBD_MARKER = "snapimg-nbd"
NBD_SERVER_RUNNING = "NBD server already running"  # QEMU's nbd-server-start (blockdev-nbd.c)
_FILTER = re.compile(r"^si[0-9a-f]{12}-cbw$")


@dataclass(frozen=True)
class Attached:
    name: str
    uri: str
    socket: Path
    target: Path


def node_key(name: str) -> str:
    """Short, stable prefix of the node names for snapshot ``name`` (QEMU allows 31 chars)."""
    return "si" + hashlib.sha1(name.encode()).hexdigest()[:12]


async def attach(
    qmp_path: Path, device: str, name: str, store_dir: Path, socket: Path | None
) -> Attached:
    split_snapshot_name(name)
    qmp = await Qmp.connect(qmp_path)
    try:
        root, size = await device_root(qmp, device)
        nodes = SnapshotNodes(node_key(name), name, store_dir / f"{name}.qcow2", None)
        if nodes.target in await qmp.node_names():
            raise SnapshotError(f"snapshot {name} is already attached to this QEMU")
        created = not store_dir.exists()
        store_dir.mkdir(exist_ok=True)
        started = False
        try:
            sock, started = await ensure_nbd_server(qmp, socket, store_dir / "nbd.sock")
            await graph.create_qcow2(nodes.target_path, size, COPY_GRANULARITY)
            await graph.add_snapshot(qmp, root, nodes)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                nodes.target_path.unlink()
            if started:
                await stop_nbd_server_if_idle(qmp)
            if created:  # a failed attach leaves no new directory
                with contextlib.suppress(OSError):
                    store_dir.rmdir()
            raise
        return Attached(name, unix_uri(name, sock), sock, nodes.target_path)
    finally:
        await qmp.close()


async def detach(qmp_path: Path, name: str) -> None:
    split_snapshot_name(name, existing=True)
    qmp = await Qmp.connect(qmp_path)
    try:
        key = node_key(name)
        infos = {
            n["node-name"]: n for n in await qmp.execute("query-named-block-nodes", {"flat": True})
        }
        tf = infos.get(f"{key}-tf")
        if f"{key}-t" not in infos or tf is None:
            raise SnapshotError(f"no snapshot {name} is attached to this QEMU")
        nodes = SnapshotNodes(key, name, Path(tf["file"]), None)
        await graph.remove_snapshot(qmp, nodes)
        with contextlib.suppress(FileNotFoundError):
            nodes.target_path.unlink()
        await stop_nbd_server_if_idle(qmp)
    finally:
        await qmp.close()


async def device_root(qmp: Qmp, device: str) -> tuple[str, int]:
    """The root node name and size of the disk of qdev id ``device``."""
    known = []
    for blk in await qmp.execute("query-block"):
        # "qdev" is the id, or a QOM path such as /machine/peripheral/ID/virtio-backend.
        qdev = str(blk.get("qdev", "")).removeprefix("/machine/peripheral/").split("/")[0]
        known.append(qdev or str(blk.get("device")))
        if device == qdev:
            inserted = blk.get("inserted")
            if not inserted:
                raise UsageError(f"device {device} has no medium")
            root = await _below_snapimg_filters(qmp, str(inserted["node-name"]))
            return root, int(inserted["image"]["virtual-size"])
    raise UsageError(f"no disk device {device!r} in this QEMU (it has: {', '.join(known)})")


async def _below_snapimg_filters(qmp: Qmp, node: str) -> str:
    """The device's own node: below the filters of snapshots already attached.

    A second fleecing job must start on that node (a job's filter is busy).
    """
    if not _FILTER.match(node):
        return node
    graph_ = await qmp.execute("x-debug-query-block-graph")
    ids = {n["name"]: n["id"] for n in graph_["nodes"]}
    names = {n["id"]: n["name"] for n in graph_["nodes"]}
    while _FILTER.match(node):
        [child] = [
            e["child"] for e in graph_["edges"] if e["parent"] == ids[node] and e["name"] == "file"
        ]
        node = str(names[child])
    return node


async def _marker_socket(qmp: Qmp) -> Path | None:
    try:
        return Path(
            await qmp.execute("qom-get", {"path": f"/objects/{NBD_MARKER}", "property": "identity"})
        )
    except QemuError:
        return None


async def ensure_nbd_server(qmp: Qmp, wanted: Path | None, default: Path) -> tuple[Path, bool]:
    """The socket of snapimg's NBD server in this QEMU, starting it if needed.

    Returns (socket, started_now).
    """
    existing = await _marker_socket(qmp)
    if existing is not None:
        if wanted is not None and wanted != existing:
            raise UsageError(f"this QEMU's NBD server already listens on {existing}")
        return existing, False
    socket = wanted or default
    if len(str(socket)) > 100:
        raise UsageError(f"socket path {socket} is too long for a unix socket")
    try:
        await qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket)}}}
        )
    except QemuError as err:
        if err.error_class == "GenericError" and err.desc == NBD_SERVER_RUNNING:
            raise UsageError(
                "this QEMU already runs an NBD server that snapimg did not start "
                "(stop it with nbd-server-stop first)"
            ) from None
        raise
    os.chmod(socket, 0o600)
    await qmp.execute(
        "object-add", {"qom-type": "authz-simple", "id": NBD_MARKER, "identity": str(socket)}
    )
    return socket, True


async def stop_nbd_server_if_idle(qmp: Qmp) -> None:
    """Stop snapimg's NBD server once no export is left on it."""
    socket = await _marker_socket(qmp)
    if socket is None or await qmp.execute("query-block-exports"):
        return
    await qmp.execute("nbd-server-stop")
    await qmp.execute("object-del", {"id": NBD_MARKER})
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
