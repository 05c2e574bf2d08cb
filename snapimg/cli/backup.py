"""``snapimg backup``, ``restore``, ``verify`` and ``prune``: backup directories.

See docs/backup.md for the backup directory layout, the digest rule and the file formats.
SIGINT and SIGTERM stop each of these commands cleanly: the work in progress is undone
(temporary files, the backup's snapshot, QEMU helper processes), one line is printed and
the exit status is 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from snapimg import interrupts
from snapimg.cli import quiesce
from snapimg.cli.attach import default_store_dir
from snapimg.errors import SnapimgError, UsageError
from snapimg.names import check_export_name, check_snapshot_name, shown
from snapimg.units import format_size


def register(sub: Any) -> None:
    b: argparse.ArgumentParser = sub.add_parser(
        "backup", help="snapshot an origin, copy it into a backup directory as a qcow2 point"
    )
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--control", type=Path, metavar="PATH", help="control socket of snapimg serve")
    src.add_argument(
        "--qmp",
        type=Path,
        metavar="SOCKET",
        help="QMP socket of a running QEMU (with --device; full backups only)",
    )
    b.add_argument("--device", metavar="QDEV-ID", help="with --qmp: the disk's device id")
    src.add_argument(
        "--libvirt",
        metavar="DOMAIN",
        help="a libvirt domain (with --disk; libvirt's pull backup, full only)",
    )
    b.add_argument("--disk", metavar="TARGET", help="with --libvirt: the disk's target (vda)")
    b.add_argument("name", metavar="NAME", help="origin (export) to back up")
    b.add_argument(
        "--to",
        type=Path,
        required=True,
        metavar="DIR",
        help="backup directory (created if its parent exists)",
    )
    b.add_argument(
        "--since",
        metavar="SNAP",
        help="incremental: copy only blocks changed since this kept snapshot",
    )
    b.add_argument(
        "--keep",
        metavar="NAME@SNAP",
        help="name the new snapshot and keep it once the backup completed (for a later --since)",
    )
    b.add_argument(
        "--sha256",
        action="store_true",
        help="also read the new point back and record the SHA-256 of the whole "
        "image (costs the virtual size)",
    )
    b.add_argument("-p", "--progress", action="store_true", help="show a progress bar")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    quiesce.add_arguments(b, libvirt=False)  # --quiesce with --libvirt: through libvirt
    b.set_defaults(func=_interruptible(_backup))

    r: argparse.ArgumentParser = sub.add_parser(
        "restore", help="write the raw image of a backup point, verified against its digest"
    )
    r.add_argument("directory", type=Path, metavar="DIR", help="backup directory")
    r.add_argument("--backup", metavar="ID", help="backup point to restore (default: newest)")
    r.add_argument("--to", type=Path, required=True, metavar="IMAGE", help="raw image to write")
    r.add_argument("--force", action="store_true", help="replace IMAGE if it exists")
    r.add_argument("-p", "--progress", action="store_true", help="show a progress bar")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    r.set_defaults(func=_interruptible(_restore))

    v: argparse.ArgumentParser = sub.add_parser(
        "verify",
        help="recompute every backup point's digest and check the qcow2 files "
        "(exit 0 all good, 1 bad points, 2 error)",
    )
    v.add_argument("directory", type=Path, metavar="DIR", help="backup directory")
    v.add_argument("--backup", metavar="ID", help="verify this point only")
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.set_defaults(func=_interruptible(_verify))

    p: argparse.ArgumentParser = sub.add_parser(
        "prune", help="merge the oldest backup points into their children, keeping the last N"
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="backup directory")
    p.add_argument(
        "--keep-last",
        type=int,
        required=True,
        metavar="N",
        help="number of newest points to keep (at least 1)",
    )
    p.add_argument(
        "-p",
        "--progress",
        action="store_true",
        help="show a progress bar (when an old directory is converted)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_interruptible(_prune))


class _Stop:
    signum = 0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _Stop.signum:
        return  # already stopping: let the clean-up finish
    _Stop.signum = signum
    interrupts.deliver()  # (held back while a QEMU tool is being started)


def _interruptible(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``command`` with SIGINT/SIGTERM turned into an orderly stop: the exception unwinds
    it (its clean-up runs), then one line and status 128 + signal number."""

    def run(args: argparse.Namespace) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)
        try:
            return command(args)
        except KeyboardInterrupt:
            pass
        except SnapimgError:
            if not _Stop.signum:  # else: e.g. a read that failed with EINTR
                raise
        signum = _Stop.signum or signal.SIGINT
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        print(f"snapimg {args.command}: {what}", file=sys.stderr, flush=True)
        return 128 + signum

    return run


def _snap_of(origin: str, text: str, flag: str) -> str:
    name, sep, snap = text.partition("@")
    if not sep:
        name, snap = origin, text
    if name != origin:
        raise UsageError(f"bad {flag} {shown(text)}: expected {origin}@SNAP or SNAP")
    return check_snapshot_name(snap)


def _backup(args: argparse.Namespace) -> int:
    # here, not at the top: every snapimg command imports this module
    from snapimg.backup.job import run_backup
    from snapimg.backup.sources import (
        ControlSource,
        LibvirtSource,
        QmpSource,
        SnapshotSource,
        preflight,
    )

    origin = check_export_name(args.name)
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
            raise UsageError(
                "--keep: a libvirt pull backup is a job that ends with the "
                "backup, nothing can be kept"
            )
        source = LibvirtSource(args.libvirt, args.disk)
    elif args.qmp is not None:
        if not args.device:
            raise UsageError("--qmp needs --device QDEV-ID")
        source = QmpSource(args.qmp, args.device, default_store_dir().absolute())
    else:
        source = ControlSource(args.control)
    preflight(source, origin)  # before anything is created
    quiesced = quiesce.wrap_source(source, args)  # None without --quiesce
    result = run_backup(
        quiesced or source,
        origin,
        args.to,
        since=since,
        keep=keep,
        sha256=args.sha256,
        progress=args.progress,
    )
    if result.notice:
        print(f"snapimg backup: notice: {result.notice}", file=sys.stderr)
    summary = result.to_json() | (quiesced.summary() if quiesced else {})
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rec = result.record
    what = "full" if rec.parent is None else f"incremental over {rec.parent}"
    c = result.copy
    print(
        f"backup {rec.id} ({what}) of {rec.snapshot} -> {args.to / rec.file}: "
        f"read {format_size(c.bytes_read)}, wrote {format_size(rec.bytes_written)}, "
        f"skipped {format_size(c.bytes_skipped)} of holes, {result.to_json()['mib_per_s']} "
        f"MiB/s, digest {rec.digest}"
        + (f", sha256 {rec.sha256}" if rec.sha256 else "")
        + ("" if not rec.snapshot_kept else f"; snapshot {rec.snapshot} kept")
        + (f"; quiesced, frozen {summary['frozen_ms']} ms" if args.quiesce else "")
    )
    sys.stdout.flush()
    return 0


def _restore(args: argparse.Namespace) -> int:
    from snapimg.backup.restore import restore

    result = restore(args.directory, args.backup, args.to, force=args.force, progress=args.progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    check = f"digest {result.digest}" if result.digest else f"sha256 {result.sha256}"
    print(
        f"restored backup {result.backup} (chain {' '.join(result.chain)}) to {result.image}: "
        f"{format_size(result.size)}, {check} verified"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Exit 0 every point matches, 1 bad points (one line each on stderr), 2 trouble."""
    from snapimg.backup.verify import verify

    try:
        reports = verify(args.directory, args.backup)
    except SnapimgError as err:
        print(f"snapimg verify: {err}", file=sys.stderr)
        return 2
    bad = [r for r in reports if not r.ok]
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(args.directory),
                    "ok": not bad,
                    "points": [r.to_json() for r in reports],
                },
                indent=2,
            )
        )
    else:
        for r in reports:
            if r.ok:
                print(f"{r.id}: ok, digest {r.digest} ({format_size(r.bytes_read)} read)")
    for r in bad:
        print(f"snapimg verify: {r.line()}", file=sys.stderr)
    return 1 if bad else 0


def _prune(args: argparse.Namespace) -> int:
    from snapimg.backup.prune import prune

    result = prune(args.directory, args.keep_last, progress=args.progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    if result.finished:
        print(f"finished an interrupted merge into {', '.join(result.finished)}")
    removed = ", ".join(result.removed) or "nothing"
    print(f"pruned {removed}; kept {', '.join(result.remaining) or 'nothing'}")
    return 0
