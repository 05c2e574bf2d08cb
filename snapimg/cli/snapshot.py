"""``snapimg snapshot create|list|drop|release``: talk to a running ``snapimg serve``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from snapimg.cli import quiesce
from snapimg.cli.common import add_control, add_json, add_size, notice, result
from snapimg.control.client import ControlClient
from snapimg.names import split_snapshot_name
from snapimg.snapinfo import ON_FULL_CHOICES, SnapshotInfo
from snapimg.units import count, format_size, parse_size

_SNAPSHOT_HELP = "the snapshot: export NAME of the origin, '@', snapshot name SNAP"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "snapshot", help="create, list, drop or release snapshots of a running server"
    )
    cmds = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", parser_class=type(p))
    cmds.required = True

    c = cmds.add_parser("create", help="take a snapshot; prints its NBD URI")
    add_control(c)
    c.add_argument("name", metavar="NAME@SNAP", help=_SNAPSHOT_HELP)
    add_size(c, "--max-size", "store space this snapshot may use, at least one block", example="1G")
    c.add_argument(
        "--writable",
        action="store_true",
        help="the snapshot export accepts writes (they never reach the origin)",
    )
    c.add_argument(
        "--on-full",
        choices=ON_FULL_CHOICES,
        default="invalidate",
        help="when --max-size or the store is exhausted: invalidate the snapshot, or "
        "fail the origin write with ENOSPC (default: %(default)s)",
    )
    quiesce.add_arguments(c, libvirt=True)
    add_json(c, "the snapshot and its URI")
    c.set_defaults(func=_create)

    ls = cmds.add_parser("list", help="list snapshots")
    add_control(ls)
    add_json(ls, "a JSON array instead of a table")
    ls.set_defaults(func=_list)

    d = cmds.add_parser("drop", help="drop a snapshot and free its store space")
    add_control(d)
    d.add_argument("name", metavar="NAME@SNAP", help=_SNAPSHOT_HELP)
    d.set_defaults(func=_drop)

    r = cmds.add_parser(
        "release",
        help="free store space of a range already copied (whole blocks); it then reads as EIO",
    )
    add_control(r)
    r.add_argument("name", metavar="NAME@SNAP", help=_SNAPSHOT_HELP)
    add_size(r, "--offset", "start of the range", example="0", required=True)
    add_size(r, "--length", "length of the range", example="1M", required=True)
    r.set_defaults(func=_release)


def _create(args: argparse.Namespace) -> int:
    origin, snap = split_snapshot_name(args.name)
    max_size = parse_size(args.max_size, "--max-size") if args.max_size is not None else None
    client = ControlClient(args.control)
    quiesce.check(args, client)
    with quiesce.window(args) as frozen:  # a no-op without --quiesce
        info, uri = client.create_snapshot(
            origin, snap, max_size=max_size, writable=args.writable, on_full=args.on_full
        )
    quiesce.record(client, info, frozen)
    if frozen is not None and frozen.frozen_ms is not None:
        info = dataclasses.replace(info, quiesced=True, frozen_ms=frozen.frozen_ms)
    if args.json:
        result(args, json.dumps({**info.to_json(), "uri": uri}, indent=2))
    else:
        result(args, uri or info.name)
    return 0


def _list(args: argparse.Namespace) -> int:
    infos = ControlClient(args.control).list_snapshots()
    if args.json:
        result(args, json.dumps([info.to_json() for info in infos], indent=2))
    elif infos:
        result(args, format_table(infos))
    else:
        notice(args, "no snapshots")
    return 0


def format_table(infos: list[SnapshotInfo]) -> str:
    header = (
        "NAME",
        "CREATED",
        "STATE",
        "PRESERVED",
        "MAX SIZE",
        "BLOCK",
        "MODE",
        "ON FULL",
        "QUIESCED",
    )
    rows = [header]
    for i in infos:
        state = "valid" if i.valid else f"invalid ({i.reason})"
        rows.append(
            (
                i.name,
                i.created.strftime("%Y-%m-%d %H:%M:%S"),
                state,
                f"{format_size(i.preserved_bytes)} ({count(i.preserved_blocks, 'block')})",
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
    origin, snap = split_snapshot_name(args.name, existing=True)
    ControlClient(args.control).drop_snapshot(origin, snap)
    return 0


def _release(args: argparse.Namespace) -> int:
    origin, snap = split_snapshot_name(args.name, existing=True)
    offset = parse_size(args.offset, "--offset")
    length = parse_size(args.length, "--length")
    done_offset, done_length = ControlClient(args.control).release(origin, snap, offset, length)
    if (done_offset, done_length) != (offset, length):
        notice(
            args,
            f"released {format_size(done_length)} at offset {done_offset} "
            f"(whole blocks only: the partial blocks at the edges of {offset}+{length} "
            "stay stored)",
        )
    return 0
