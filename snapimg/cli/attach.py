"""``snapimg attach`` / ``snapimg detach``: snapshots inside an already-running QEMU VM.

QEMU does the copy-before-write itself (see :mod:`snapimg.backends.attach`); snapimg only
builds and removes the graph over the VM's QMP socket and prints the snapshot's NBD URI.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from snapimg.cli import quiesce


def default_store_dir() -> Path:
    return Path(tempfile.gettempdir()) / "snapimg-attach"


def register(sub: Any) -> None:
    a: argparse.ArgumentParser = sub.add_parser(
        "attach", help="snapshot a disk of a running QEMU VM over its QMP socket; prints the URI"
    )
    a.add_argument(
        "--qmp", type=Path, required=True, metavar="SOCKET", help="the VM's QMP unix socket"
    )
    a.add_argument(
        "--device",
        required=True,
        metavar="QDEV-ID",
        help="the disk's device id (ide-hd, scsi-hd, virtio-blk ...)",
    )
    a.add_argument(
        "name",
        metavar="NAME@SNAP",
        help="export name of the snapshot (NAME: any name for the disk)",
    )
    a.add_argument(
        "--store-dir",
        type=Path,
        metavar="DIR",
        help=f"directory for the target image (default: {default_store_dir()})",
    )
    a.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="unix socket of QEMU's NBD server (default: STORE_DIR/nbd.sock)",
    )
    quiesce.add_arguments(a, libvirt=False)
    a.set_defaults(func=_attach)

    d: argparse.ArgumentParser = sub.add_parser(
        "detach", help="remove a snapshot taken with attach; the VM's disk is left as before"
    )
    d.add_argument(
        "--qmp", type=Path, required=True, metavar="SOCKET", help="the VM's QMP unix socket"
    )
    d.add_argument("name", metavar="NAME@SNAP", help="the snapshot attach took")
    d.set_defaults(func=_detach)


def _attach(args: argparse.Namespace) -> int:
    import asyncio  # here, not at the top: every snapimg command imports this module

    from snapimg.backends.attach import attach

    store = (args.store_dir or default_store_dir()).absolute()
    socket = args.socket.absolute() if args.socket else None
    with quiesce.window(args):  # a no-op without --quiesce
        result = asyncio.run(attach(args.qmp, args.device, args.name, store, socket))
    print(result.uri)
    return 0


def _detach(args: argparse.Namespace) -> int:
    import asyncio

    from snapimg.backends.attach import detach

    asyncio.run(detach(args.qmp, args.name))
    return 0
