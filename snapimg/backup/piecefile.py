"""``DIR/<id>.pieces``: the piece digests of one backup point (docs/backup.md).

Binary, little endian: a 40-byte header ``struct "<8sIIQQQ"`` = magic ``b"SNAPPCS1"``,
version 1, 0, image size, piece size, entry count; then ``count`` entries of a u64 piece
index and its 32-byte SHA-256, in increasing index order, for every piece that is not all
zero (absent pieces are all zero); then the SHA-256 of everything before it.  An
incremental backup starts from its parent's file and replaces the pieces it changed, so
nothing but the changed pieces is ever hashed again.  Written under a temporary name,
fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from snapimg.digest import DIGEST_SIZE, PieceDigests
from snapimg.errors import BackupError
from snapimg.fileio import fsync_dir

MAGIC = b"SNAPPCS1"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
_INDEX = struct.Struct("<Q")
_ENTRY = _INDEX.size + DIGEST_SIZE


def encode(digests: PieceDigests) -> bytes:
    entries = digests.nonzero()
    body = bytearray(
        _HEADER.pack(MAGIC, VERSION, 0, digests.size, digests.piece_size, len(entries))
    )
    for index, digest in entries:
        body += _INDEX.pack(index)
        body += digest
    body += hashlib.sha256(body).digest()
    return bytes(body)


def decode(data: bytes, name: str) -> PieceDigests:
    if len(data) < _HEADER.size + DIGEST_SIZE:
        raise BackupError(f"{name}: too short for a piece digest file")
    body, trailer = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != trailer:
        raise BackupError(f"{name}: checksum mismatch (the piece digest file is damaged)")
    magic, version, _, size, piece_size, count = _HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise BackupError(f"{name}: not a piece digest file of version {VERSION}")
    if len(body) != _HEADER.size + count * _ENTRY or piece_size <= 0:
        raise BackupError(f"{name}: bad length for {count} entries")
    out = PieceDigests(size, piece_size)
    last = -1
    for i in range(count):
        pos = _HEADER.size + i * _ENTRY
        (index,) = _INDEX.unpack_from(body, pos)
        if index <= last or index >= out.count:
            raise BackupError(f"{name}: entry {i} (piece {index}) out of order or range")
        out.set(index, body[pos + _INDEX.size : pos + _ENTRY])
        last = index
    return out


def read(path: Path) -> PieceDigests:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BackupError(f"cannot read {path}: {err.strerror}") from None
    return decode(data, str(path))


def write(path: Path, digests: PieceDigests) -> None:
    """Write ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(encode(digests))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
