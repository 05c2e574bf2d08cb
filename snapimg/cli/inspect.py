"""``snapimg inspect``, ``ls``, ``cat``, ``diff`` and ``checksum``: looking inside images.

TARGET is a raw image path (other formats through qemu-storage-daemon), a snapimg store
directory (``inspect`` only), an NBD URI such as a live snapshot export, or a backup
directory (its newest point, or ``--backup ID``).  JSON output follows docs/inspect-json.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from snapimg.cli.common import add_size
from snapimg.errors import SnapimgError
from snapimg.units import parse_size

if TYPE_CHECKING:
    from snapimg.inspect.files import FileTree


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "inspect", help="show size, format, partitions, filesystems and allocation of a target"
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help="image path, store directory, backup directory or nbd:// URI",
    )
    _backup_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("ls", help="list a directory inside a FAT, ext or NTFS filesystem")
    p.add_argument(
        "target",
        metavar="TARGET[:PART]",
        help="image, backup directory or nbd:// URI, optional :PART",
    )
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="directory (default /)")
    _backup_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_ls)

    p = sub.add_parser("cat", help="write a file inside a FAT, ext or NTFS filesystem to stdout")
    p.add_argument(
        "target",
        metavar="TARGET[:PART]",
        help="image, backup directory or nbd:// URI, optional :PART",
    )
    p.add_argument("path", metavar="PATH", help="file to print")
    _backup_option(p)
    p.set_defaults(func=_cat)

    p = sub.add_parser(
        "diff", help="changed block ranges between two images or snapshots (exit 0 same, 1 differ)"
    )
    p.add_argument("a", metavar="A", help="image path or nbd:// URI")
    p.add_argument("b", metavar="B", help="image path or nbd:// URI")
    add_size(
        p,
        "--block-size",
        "granularity of ranges, a power of two from 4K to 1M",
        example="64K",
        default="64K",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_diff)

    p = sub.add_parser("checksum", help="digest of all bytes of a target, skipping holes")
    p.add_argument("target", metavar="TARGET", help="image path, backup directory or nbd:// URI")
    _backup_option(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--algo", default="sha256", help="hashlib algorithm (default sha256)")
    how.add_argument(
        "--pieces",
        action="store_true",
        help="the sha256-pieces image digest that backups record (zero pieces cost nothing)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_checksum)


def _backup_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backup", metavar="ID", help="with a backup directory: this point (default: the newest)"
    )


def _dump(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from snapimg.inspect.image import inspect_source
    from snapimg.inspect.point import is_backup_dir
    from snapimg.inspect.report import render_inspect
    from snapimg.inspect.target import open_target

    path = Path(args.target)
    if path.is_dir() and args.backup is None and not is_backup_dir(path):
        from snapimg.inspect.store import inspect_store, render_store

        rep = inspect_store(Path(args.target))
        if args.json:
            _dump(rep)
        else:
            print(render_store(rep))
        return 0
    with open_target(args.target, args.backup) as src:
        rep = inspect_source(src)
    if args.json:
        _dump(rep)
    else:
        print(render_inspect(rep))
    return 0


@contextlib.contextmanager
def _tree(args: argparse.Namespace) -> Iterator[FileTree]:
    """The filesystem of ``TARGET[:PART]`` (``--backup``), open while in the block."""
    from snapimg.inspect.files import open_tree
    from snapimg.inspect.target import open_target, split_part

    target, part = split_part(args.target)
    with open_target(target, args.backup) as src:
        yield open_tree(src, part)


def _ls(args: argparse.Namespace) -> int:
    from snapimg.inspect.report import format_table

    with _tree(args) as tree:
        top = tree.stat(args.path)
        entries = tree.listdir(args.path) if top.kind == "dir" else [top]
    entries.sort(key=lambda e: e.name)
    if args.json:
        _dump({"schema": 1, "path": args.path, "entries": [e.to_json() for e in entries]})
        return 0
    rows = [
        [
            e.kind,
            str(e.size),
            e.mtime.strftime("%Y-%m-%d %H:%M:%S") if e.mtime else "-",
            e.name + ("/" if e.kind == "dir" else "") + (f" -> {e.target}" if e.target else ""),
        ]
        for e in entries
    ]
    print(format_table(["TYPE", "SIZE", "MODIFIED", "NAME"], rows, right=(1,)))
    return 0


def _cat(args: argparse.Namespace) -> int:
    with _tree(args) as tree:
        stream = tree.open(args.path)
        out = sys.stdout.buffer
        while chunk := stream.read(1 << 20):
            out.write(chunk)
        out.flush()
    return 0


def _diff(args: argparse.Namespace) -> int:
    """Exit 0 identical, 1 different, 2 trouble (as cmp)."""
    try:
        return _run_diff(args)
    except SnapimgError as err:
        print(f"snapimg diff: {err}", file=sys.stderr)
        return 2


def _run_diff(args: argparse.Namespace) -> int:
    from snapimg.inspect.diff import diff_sources
    from snapimg.inspect.report import format_table, size_cell
    from snapimg.inspect.target import open_target
    from snapimg.progress import Progress
    from snapimg.units import check_block_size, count, format_size

    bs = parse_size(args.block_size, "block size")
    check_block_size(bs)
    with open_target(args.a) as a, open_target(args.b) as b:
        # a bar only for work that takes longer than a second, erased when done
        progress = Progress("diff", min(a.size, b.size), sys.stderr, delay=1.0, erase=True)
        try:
            result = diff_sources(a, b, bs, progress.update)
        finally:
            progress.finish()
    if args.json:
        _dump({"schema": 1, "a": args.a, "b": args.b, **result.to_json()})
    else:
        if result.ranges:
            rows = [[str(o), str(n), size_cell(n)] for o, n in result.ranges]
            print(format_table(["OFFSET", "LENGTH", "SIZE"], rows, right=(0, 1, 2)))
        sizes = (
            ""
            if result.size_a == result.size_b
            else (f"; sizes differ: {result.size_a} and {result.size_b} bytes")
        )
        print(
            f"{count(result.changed_blocks, 'changed block')} of {format_size(bs)} in "
            f"{count(len(result.ranges), 'range')}, {count(result.changed_bytes, 'byte')}"
            f"{sizes}"
        )
    return 0 if result.identical else 1


def _checksum(args: argparse.Namespace) -> int:
    from snapimg.digest import rule_json
    from snapimg.inspect.checksum import check_algo, checksum, pieces_digest
    from snapimg.inspect.target import open_target
    from snapimg.progress import Progress

    if not args.pieces:
        check_algo(args.algo)
    with open_target(args.target, args.backup) as src:
        size = src.size
        # a bar only for work that takes longer than a second, erased when done
        progress = Progress("checksum", size, sys.stderr, delay=1.0, erase=True)
        try:
            if args.pieces:
                digest = pieces_digest(src, progress.update)
            else:
                digest = checksum(src, args.algo, progress.update)
        finally:
            progress.finish()
    if args.json:
        obj: dict[str, Any] = {"target": args.target}
        if args.backup is not None:
            obj["backup"] = args.backup
        obj |= {
            "size": size,
            "algo": "sha256-pieces" if args.pieces else args.algo,
            "digest": digest,
        }
        if args.pieces:
            obj["digest_rule"] = rule_json()
        _dump(obj)
        return 0
    print(f"{digest}  {args.target}")
    return 0
