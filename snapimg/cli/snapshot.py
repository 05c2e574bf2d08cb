"""``snapimg snapshot create|list|drop|release``: talk to a running ``snapimg serve``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from snapimg.backends.base import ON_FULL_CHOICES, SnapshotInfo
from snapimg.cli import quiesce
from snapimg.control.client import ControlClient
from snapimg.errors import UsageError
from snapimg.units import format_size, parse_size


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "snapshot", help="create, list, drop or release snapshots of a running server"
    )
    cmds = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", parser_class=type(p))
    cmds.required = True

    c = cmds.add_parser("create", help="take a snapshot; prints its NBD URI")
    _control(c)
    c.add_argument("name", metavar="NAME@SNAP")
    c.add_argument("--max-size", help="store space this snapshot may use (e.g. 1G)")
    c.add_argument("--writable", action="store_true", help="the snapshot export accepts writes")
    c.add_argument(
        "--on-full",
        choices=ON_FULL_CHOICES,
        default="invalidate",
        help="when --max-size or the store is exhausted (default: invalidate)",
    )
    quiesce.add_arguments(c, libvirt=True)
    c.set_defaults(func=_create)

    ls = cmds.add_parser("list", help="list snapshots")
    _control(ls)
    ls.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    ls.set_defaults(func=_list)

    d = cmds.add_parser("drop", help="drop a snapshot and free its store space")
    _control(d)
    d.add_argument("name", metavar="NAME@SNAP")
    d.set_defaults(func=_drop)

    r = cmds.add_parser(
        "release", help="free store space of a range already copied; it then reads as EIO"
    )
    _control(r)
    r.add_argument("name", metavar="NAME@SNAP")
    r.add_argument("--offset", required=True, help="start of the range (bytes, K/M/G)")
    r.add_argument("--length", required=True, help="length of the range (bytes, K/M/G)")
    r.set_defaults(func=_release)


def _control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", type=Path, required=True, help="control socket of snapimg serve")


def split_name(text: str) -> tuple[str, str]:
    origin, sep, snap = text.partition("@")
    if not sep or not origin or not snap or "@" in snap:
        raise UsageError(f"bad snapshot name {text!r}: expected NAME@SNAP")
    return origin, snap


def _create(args: argparse.Namespace) -> int:
    origin, snap = split_name(args.name)
    max_size = parse_size(args.max_size, "--max-size") if args.max_size else None
    client = ControlClient(args.control)
    quiesce.check(args, client)
    with quiesce.window(args) as frozen:  # a no-op without --quiesce
        info, uri = client.create_snapshot(
            origin, snap, max_size=max_size, writable=args.writable, on_full=args.on_full
        )
    quiesce.record(client, info, frozen)
    print(uri)
    return 0


def _list(args: argparse.Namespace) -> int:
    infos = ControlClient(args.control).list_snapshots()
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
    else:
        print(format_table(infos))
    return 0


def format_table(infos: list[SnapshotInfo]) -> str:
    header = ("NAME", "CREATED", "STATE", "PRESERVED", "MAX SIZE", "BLOCK", "MODE", "ON FULL",
              "QUIESCED")
    rows = [header]
    for i in infos:
        state = "valid" if i.valid else f"invalid ({i.reason})"
        rows.append(
            (
                i.name,
                i.created.strftime("%Y-%m-%d %H:%M:%S"),
                state,
                f"{format_size(i.preserved_bytes)} ({i.preserved_blocks} blocks)",
                format_size(i.max_size) if i.max_size is not None else "-",
                format_size(i.block_size),
                "rw" if i.writable else "ro",
                i.on_full,
                "no" if not i.quiesced else f"frozen {i.frozen_ms} ms",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _drop(args: argparse.Namespace) -> int:
    origin, snap = split_name(args.name)
    ControlClient(args.control).drop_snapshot(origin, snap)
    return 0


def _release(args: argparse.Namespace) -> int:
    origin, snap = split_name(args.name)
    offset = parse_size(args.offset, "--offset")
    length = parse_size(args.length, "--length")
    ControlClient(args.control).release(origin, snap, offset, length)
    return 0
