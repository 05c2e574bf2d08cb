"""A deterministic writer for the cpio "newc" format that Linux unpacks as an initramfs.

Every entry gets mtime 0, uid/gid 0 (unless asked) and inode numbers in the order written, so
that the same entries always give the same bytes.  Gzip members are made with mtime 0 too, and
the kernel accepts several gzip'd archives concatenated (a later entry overrides an earlier one),
which is how per-run files (keys) are laid over a cached base image.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: ``path`` without a leading slash, ``mode`` with its file type bits."""

    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def _header(ino: int, entry: Entry, name: bytes, nlink: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        0,
        len(entry.data),
        0,
        0,
        0,
        0,
        len(name) + 1,
        0,
    )
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def archive(entries: list[Entry]) -> bytes:
    """The newc archive of ``entries`` in the given order, with its trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry(_TRAILER, 0)], start=1):
        name = entry.path.lstrip("/").encode()
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        head = _header(0 if entry.path == _TRAILER else ino, entry, name, nlink)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def gzipped(entries: list[Entry], level: int = 9) -> bytes:
    """``archive(entries)`` gzip-compressed with a fixed (zero) timestamp."""
    return gzip.compress(archive(entries), compresslevel=level, mtime=0)
