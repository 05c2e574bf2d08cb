"""Where a backup's snapshot comes from: a ``snapimg serve`` control socket, or a running
QEMU's QMP socket (``snapimg attach``: QEMU does the copy-before-write itself), or a
libvirt domain's disk (libvirt's pull-mode backup API).

A source creates a snapshot and returns its NBD URI, drops it, and, when it can, lists the
ranges written since an older snapshot (what an incremental copies).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from snapimg.errors import BackupError, SnapimgError, UsageError
from snapimg.nbd.uri import unix_uri


class SnapshotSource(Protocol):
    supports_incremental: bool

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        """Create ``origin@snap``; returns (NBD URI of the snapshot, block size)."""
        ...

    def drop(self, origin: str, snap: str) -> bool:
        """Drop ``origin@snap``; False when that failed (it may not exist)."""
        ...

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]: ...


def preflight(source: SnapshotSource, origin: str) -> None:
    """Check, before anything is created, that ``source`` answers and has ``origin``."""
    if isinstance(source, ControlSource):
        origins = [str(e["name"]) for e in source.client.exports() if "@" not in e["name"]]
        if origin not in origins:
            raise UsageError(
                f"the server at {source.client.path} serves no origin "
                f"{origin!r} (it serves: {', '.join(origins) or 'none'})"
            )
    elif isinstance(source, QmpSource) and not source.qmp.exists():
        raise UsageError(f"--qmp {source.qmp}: no such socket")


class ControlSource:
    """Snapshots of an origin served by ``snapimg serve`` (its control socket)."""

    supports_incremental = True

    def __init__(self, control: Path) -> None:
        from snapimg.control.client import ControlClient

        self.client = ControlClient(control)

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        info, uri = self.client.create_snapshot(
            origin, snap, max_size=None, writable=False, on_full="invalidate"
        )
        if uri is None:
            self.drop(origin, snap)
            raise BackupError(f"the server did not give an NBD URI for {origin}@{snap}")
        return uri, info.block_size

    def drop(self, origin: str, snap: str) -> bool:
        try:
            self.client.drop_snapshot(origin, snap)
        except SnapimgError:
            return False
        return True

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        return self.client.changed_ranges(origin, snap)


class QmpSource:
    """Snapshots of a disk of a running QEMU, through :mod:`snapimg.backends.attach`.

    QEMU keeps no list of blocks changed since an attached snapshot, so incrementals are
    not possible: a backup asked for one falls back to a full backup (with a notice).
    """

    supports_incremental = False

    def __init__(self, qmp: Path, device: str, store_dir: Path) -> None:
        self.qmp = qmp
        self.device = device
        self.store_dir = store_dir

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        import asyncio

        from snapimg.backends.attach import attach
        from snapimg.backends.qsd.graph import COPY_GRANULARITY

        result = asyncio.run(
            attach(self.qmp, self.device, f"{origin}@{snap}", self.store_dir, None)
        )
        return result.uri, COPY_GRANULARITY

    def drop(self, origin: str, snap: str) -> bool:
        import asyncio

        from snapimg.backends.attach import detach

        try:
            asyncio.run(detach(self.qmp, f"{origin}@{snap}"))
        except SnapimgError:
            return False
        return True

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        raise BackupError("a QEMU attached through QMP cannot tell which blocks changed")


class LibvirtSource:
    """A disk of a libvirt domain, through libvirt's pull-mode backup API.

    ``backupBegin`` with ``<domainbackup mode='pull'>`` makes QEMU export the disk's
    point-in-time view on a unix socket as NBD export TARGET; ``abortJob`` ends it and
    libvirt deletes the scratch file.  The snapshot is a job of the domain, so it cannot
    be kept, and without checkpoints (raw images have no bitmaps) no incrementals.
    """

    supports_incremental = False

    def __init__(self, domain: str, disk: str, uri: str = "qemu:///system") -> None:
        try:
            import libvirt
        except ImportError:
            raise BackupError(
                "--libvirt needs the libvirt Python binding (pip install libvirt-python)"
            ) from None
        self._libvirt: Any = libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self.conn = libvirt.open(uri)
            self.dom = self.conn.lookupByName(domain)
        except libvirt.libvirtError as err:
            raise BackupError(f"libvirt: {err.get_error_message()}") from None
        targets = self._disk_targets()
        if disk not in targets:
            raise UsageError(
                f"domain {domain} has no disk {disk!r} (it has: {', '.join(targets) or 'none'})"
            )
        self.domain = domain
        self.disk = disk
        self.workdir: Path | None = None

    def _disk_targets(self) -> list[str]:
        root = ElementTree.fromstring(self.dom.XMLDesc(0))
        return [
            str(t.get("dev"))
            for d in root.iter("disk")
            if d.get("device", "disk") == "disk"
            for t in d.iter("target")
        ]

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        self.workdir = Path(tempfile.mkdtemp(prefix="snapimg-lv-"))
        socket = self.workdir / "nbd.sock"
        disks = "".join(
            f"<disk name={quoteattr(t)} backup='yes' type='file'>"
            f"<scratch file={quoteattr(str(self.workdir / 'scratch.qcow2'))}/></disk>"
            if t == self.disk
            else f"<disk name={quoteattr(t)} backup='no'/>"
            for t in self._disk_targets()
        )
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' "
            f"socket={quoteattr(str(socket))}/><disks>{disks}</disks></domainbackup>"
        )
        try:
            self.dom.backupBegin(xml, None, 0)
        except self._libvirt.libvirtError as err:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise BackupError(f"libvirt backupBegin: {err.get_error_message()}") from None
        return unix_uri(self.disk, socket), 64 * 1024

    def drop(self, origin: str, snap: str) -> bool:
        """End the pull backup, but only if it is the one this source began."""
        if self.workdir is None:
            return False
        try:
            if str(self.workdir) not in self.dom.backupGetXMLDesc(0):
                return False
            self.dom.abortJob()
        except self._libvirt.libvirtError:
            return False
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return True

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        raise BackupError("libvirt pull backups of raw disks have no changed-block list")
