"""``--quiesce`` for snapshot create, attach and backup, and ``snapimg thaw``.

The commands add the options with :func:`add_arguments` and wrap the one call that takes the
snapshot in :func:`window`; the machinery is :mod:`snapimg.qga` (imported when used: every
snapimg command imports this module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapimg.errors import SnapimgError, UsageError

if TYPE_CHECKING:
    from snapimg.backup.sources import SnapshotSource
    from snapimg.control.client import ControlClient
    from snapimg.qga.quiesce import FrozenWindow
    from snapimg.snapinfo import SnapshotInfo

DEFAULT_TIMEOUT = 10.0
QGA_HELP = (
    "unix socket of the VM's qemu-guest-agent channel (QEMU: -chardev socket,"
    "path=SOCKET,server=on,wait=off,id=qga0 -device virtio-serial -device "
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0)"
)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 3600]")
    return value


def add_arguments(parser: argparse.ArgumentParser, *, libvirt: bool) -> None:
    """``--quiesce``, ``--qga SOCKET``, ``--quiesce-timeout``; ``--libvirt DOMAIN`` when the
    command has no --libvirt of its own (``libvirt=True``)."""
    group = parser.add_argument_group(
        "quiescing",
        "freeze the guest's filesystems through its qemu-guest-agent while the "
        "snapshot is taken (application-consistent); thawed on every path",
    )
    group.add_argument(
        "--quiesce", action="store_true", help="freeze the guest's filesystems around the snapshot"
    )
    group.add_argument("--qga", type=Path, metavar="SOCKET", help=QGA_HELP)
    if libvirt:
        group.add_argument(
            "--libvirt",
            metavar="DOMAIN",
            help="quiesce through libvirt's agent connection of DOMAIN "
            "(virDomainFSFreeze/virDomainFSThaw) instead of --qga",
        )
    group.add_argument(
        "--quiesce-timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="limit for each agent command and for the "
        f"snapshot while frozen (default {DEFAULT_TIMEOUT:g})",
    )


def _target(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    qga: Path | None = getattr(args, "qga", None)
    domain: str | None = getattr(args, "libvirt", None)
    if not args.quiesce:
        if qga is not None:
            raise UsageError("--qga goes with --quiesce")
        return None, None
    if qga is not None:
        return qga.absolute(), None
    if domain is None:
        hint = " or --libvirt DOMAIN" if hasattr(args, "libvirt") else ""
        raise UsageError(f"--quiesce needs --qga SOCKET{hint}")
    return None, domain


def check(args: argparse.Namespace, client: ControlClient | None = None) -> None:
    """Refuse bad quiesce options, and with --quiesce a control socket nobody answers,
    before anything is frozen."""
    _target(args)
    if args.quiesce and client is not None:
        client.call("ping")


@contextlib.contextmanager
def window(args: argparse.Namespace) -> Iterator[FrozenWindow | None]:
    """With ``--quiesce``: the guest frozen around the block (yields the FrozenWindow, filled
    in when the block is left); without: nothing happens (yields None)."""
    qga, domain = _target(args)
    if not args.quiesce:
        yield None
        return
    from snapimg.qga.quiesce import quiesced

    with quiesced(qga, domain, timeout=args.quiesce_timeout) as frozen:
        yield frozen
    if frozen.filesystems == 0:
        print(
            f"snapimg {args.command}: warning: the guest agent froze no filesystem", file=sys.stderr
        )


def record(client: ControlClient, info: SnapshotInfo, frozen: FrozenWindow | None) -> None:
    """Tell the server that ``info`` was taken while frozen (after the thaw: outside the
    window)."""
    if frozen is not None and frozen.frozen_ms is not None:
        _record(client, info.origin, info.snap, frozen.frozen_ms, info.created)


def _record(
    client: ControlClient, origin: str, snap: str, frozen_ms: int, created: datetime | None
) -> None:
    try:
        client.record_quiesce(origin, snap, frozen_ms, created)
    except SnapimgError as err:  # the snapshot is there and was quiesced: warn, do not fail
        print(
            f"snapimg: warning: {origin}@{snap} was taken quiesced, but the server did not "
            f"record it: {err}",
            file=sys.stderr,
        )


def wrap_source(source: SnapshotSource, args: argparse.Namespace) -> QuiescedSource | None:
    """With --quiesce, ``source`` whose snapshots are taken while the guest is frozen."""
    check(args)
    return QuiescedSource(source, args) if args.quiesce else None


class QuiescedSource:
    """A backup source whose ``create`` runs inside the frozen window."""

    def __init__(self, inner: SnapshotSource, args: argparse.Namespace) -> None:
        check(args, getattr(inner, "client", None))
        self.inner = inner
        self.args = args
        self.supports_incremental = inner.supports_incremental
        self.frozen: FrozenWindow | None = None

    def create(self, origin: str, snap: str) -> tuple[str, int]:
        with window(self.args) as frozen:
            result = self.inner.create(origin, snap)
        self.frozen = frozen
        client: ControlClient | None = getattr(self.inner, "client", None)
        if client is not None and frozen is not None and frozen.frozen_ms is not None:
            _record(client, origin, snap, frozen.frozen_ms, None)  # shows if it is kept
        return result

    def drop(self, origin: str, snap: str) -> bool:
        return self.inner.drop(origin, snap)

    def changed_ranges(self, origin: str, snap: str) -> list[tuple[int, int]]:
        return self.inner.changed_ranges(origin, snap)

    def summary(self) -> dict[str, Any]:
        if self.frozen is None:
            return {"quiesced": False, "frozen_ms": None}
        return self.frozen.to_json()


def register(sub: Any) -> None:
    t: argparse.ArgumentParser = sub.add_parser(
        "thaw", help="thaw a guest's filesystems left frozen (e.g. by a killed snapimg)"
    )
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--qga", type=Path, metavar="SOCKET", help=QGA_HELP)
    where.add_argument("--libvirt", metavar="DOMAIN", help="thaw through libvirt (virDomainFSThaw)")
    t.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit for each agent command (default {DEFAULT_TIMEOUT:g})",
    )
    t.add_argument("--json", action="store_true", help="print a JSON object")
    t.set_defaults(func=_thaw)


def _thaw(args: argparse.Namespace) -> int:
    from snapimg.qga.quiesce import thaw

    count = thaw(args.qga.absolute() if args.qga else None, args.libvirt, timeout=args.timeout)
    if args.json:
        print(json.dumps({"thawed": count}))
    elif count:
        print(f"thawed {count} filesystem{'s' if count != 1 else ''}")
    else:
        print("nothing was frozen")
    return 0
