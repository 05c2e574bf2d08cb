"""``snapimg backup`` and ``snapimg restore``: full and incremental backups of snapshots.

See docs/backup.md for the backup directory layout and the file formats.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from snapimg.cli import quiesce
from snapimg.cli.attach import default_store_dir
from snapimg.errors import SnapimgError, UsageError
from snapimg.units import format_size


def register(sub: Any) -> None:
    b: argparse.ArgumentParser = sub.add_parser(
        "backup", help="snapshot an origin, copy it into a backup directory, verify, drop")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--control", type=Path, metavar="PATH",
                     help="control socket of snapimg serve")
    src.add_argument("--qmp", type=Path, metavar="SOCKET",
                     help="QMP socket of a running QEMU (with --device; full backups only)")
    b.add_argument("--device", metavar="QDEV-ID", help="with --qmp: the disk's device id")
    src.add_argument("--libvirt", metavar="DOMAIN",
                     help="a libvirt domain (with --disk; libvirt's pull backup, full only)")
    b.add_argument("--disk", metavar="TARGET", help="with --libvirt: the disk's target (vda)")
    b.add_argument("name", metavar="NAME", help="origin (export) to back up")
    b.add_argument("--to", type=Path, required=True, metavar="DIR", help="backup directory")
    b.add_argument("--since", metavar="SNAP",
                   help="incremental: copy only blocks changed since this kept snapshot")
    b.add_argument("--keep", metavar="NAME@SNAP",
                   help="name the new snapshot and keep it (for a later --since)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    quiesce.add_arguments(b, libvirt=False)  # --quiesce with --libvirt: through libvirt
    b.set_defaults(func=_backup)

    r: argparse.ArgumentParser = sub.add_parser(
        "restore", help="rebuild the raw image as of a backup and verify its sha256")
    r.add_argument("directory", type=Path, metavar="DIR", help="backup directory")
    r.add_argument("--backup", metavar="ID", help="backup to restore (default: the newest)")
    r.add_argument("--to", type=Path, required=True, metavar="IMAGE", help="raw image to write")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.set_defaults(func=_restore)


def _snap_of(origin: str, text: str, flag: str) -> str:
    name, sep, snap = text.rpartition("@")
    if not sep:
        name, snap = origin, text
    if name != origin or not snap or "@" in snap or "/" in snap:
        raise UsageError(f"bad {flag} {text!r}: expected {origin}@SNAP or SNAP")
    return snap


_signalled: list[int] = []


def _terminate(signum: int, frame: FrameType | None) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt


def _backup(args: argparse.Namespace) -> int:
    # here, not at the top: every snapimg command imports this module
    from snapimg.backup.job import run_backup
    from snapimg.backup.sources import ControlSource, LibvirtSource, QmpSource, SnapshotSource

    origin: str = args.name
    if not origin or "@" in origin:
        raise UsageError(f"bad origin name {origin!r}")
    since = _snap_of(origin, args.since, "--since") if args.since else None
    keep = _snap_of(origin, args.keep, "--keep") if args.keep else None
    if keep is not None and keep == since:
        raise UsageError(f"--keep {args.keep} names the --since snapshot")
    if args.device and args.qmp is None:
        raise UsageError("--device goes with --qmp")
    if args.disk and args.libvirt is None:
        raise UsageError("--disk goes with --libvirt")
    source: SnapshotSource
    if args.libvirt is not None:
        if not args.disk:
            raise UsageError("--libvirt needs --disk TARGET")
        if keep is not None:
            raise UsageError("--keep: a libvirt pull backup is a job that ends with the "
                             "backup, nothing can be kept")
        source = LibvirtSource(args.libvirt, args.disk)
    elif args.qmp is not None:
        if not args.device:
            raise UsageError("--qmp needs --device QDEV-ID")
        source = QmpSource(args.qmp, args.device, default_store_dir().absolute())
    else:
        source = ControlSource(args.control)
    quiesced = quiesce.wrap_source(source, args)  # None without --quiesce
    source = quiesced or source
    for sig in (signal.SIGINT, signal.SIGTERM):  # unwind: drop the snapshot, remove temp files
        signal.signal(sig, _terminate)
    try:
        result = run_backup(source, origin, args.to, since=since, keep=keep,
                            progress=False if args.json else None)
    except SnapimgError:
        if _signalled:  # e.g. a read that failed with EINTR: report the signal, not that
            raise KeyboardInterrupt from None
        raise
    if result.notice:
        print(f"snapimg backup: notice: {result.notice}", file=sys.stderr)
    summary = result.to_json() | (quiesced.summary() if quiesced else {})
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rec = result.record
    what = "full" if rec.parent is None else f"incremental over {rec.parent}"
    c = result.copy
    print(f"backup {rec.id} ({what}) of {rec.snapshot} -> {args.to / rec.file}: "
          f"read {format_size(c.bytes_read)}, wrote {format_size(rec.bytes_written)}, "
          f"skipped {format_size(c.bytes_skipped)} of holes, {result.to_json()['mib_per_s']} "
          f"MiB/s, sha256 {rec.sha256}"
          + ("" if not rec.snapshot_kept else f"; snapshot {rec.snapshot} kept")
          + (f"; quiesced, frozen {summary['frozen_ms']} ms" if args.quiesce else ""))
    sys.stdout.flush()
    return 0


def _restore(args: argparse.Namespace) -> int:
    from snapimg.backup.restore import restore

    signal.signal(signal.SIGTERM, _terminate)
    result = restore(args.directory, args.backup, args.to,
                     progress=False if args.json else None)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"restored backup {result.backup} (chain {' '.join(result.chain)}) to {result.image}: "
          f"{format_size(result.size)}, sha256 {result.sha256} verified")
    return 0
