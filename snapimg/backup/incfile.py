"""The incremental backup file format (``ID.inc``, docs/backup.md).

An incremental file is a sparse file of three parts:

1. bytes ``[0, size)``: a sparse raw image of the full size that holds the new content of
   every changed *data* range at its own offset and holes everywhere else;
2. at ``table_offset`` (``size`` rounded up to 4 KiB): the range table, UTF-8 JSON
   ``{"format": "snapimg-incremental", "version": 1, "size": N, "block_size": B,
   "data": [[offset, length], ...], "zero": [[offset, length], ...]}``: ``data`` ranges take
   their content from part 1, ``zero`` ranges read as zeroes; every other byte is the
   parent's;
3. the last 32 bytes: footer ``struct "<8sQQI4x"`` = magic ``b"SNAPINC1"``, table_offset,
   table_length, CRC-32 of the table.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from snapimg.errors import BackupError

MAGIC = b"SNAPINC1"
FORMAT = "snapimg-incremental"
VERSION = 1
_FOOTER = struct.Struct("<8sQQI4x")
ALIGN = 4096

Range = tuple[int, int]


@dataclass
class IncTable:
    size: int
    block_size: int
    data: list[Range] = field(default_factory=list)
    zero: list[Range] = field(default_factory=list)

    def overrides(self) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) of every changed range, sorted by offset."""
        out = [(o, n, True) for o, n in self.data] + [(o, n, False) for o, n in self.zero]
        out.sort()
        return out


def table_offset(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def write_table(fd: int, table: IncTable) -> int:
    """Append the range table and footer after the image part; returns the file length."""
    body = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "size": table.size,
            "block_size": table.block_size,
            "data": [list(r) for r in table.data],
            "zero": [list(r) for r in table.zero],
        },
        separators=(",", ":"),
    ).encode()
    off = table_offset(table.size)
    footer = _FOOTER.pack(MAGIC, off, len(body), zlib.crc32(body))
    os.pwrite(fd, body + footer, off)
    end = off + len(body) + len(footer)
    os.ftruncate(fd, end)
    return end


def read_table(path: Path) -> IncTable:
    """Read and check the range table of an incremental file."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end < _FOOTER.size:
                raise BackupError(f"{path}: too short for an incremental backup")
            f.seek(end - _FOOTER.size)
            magic, off, length, crc = _FOOTER.unpack(f.read(_FOOTER.size))
            if magic != MAGIC or off + length + _FOOTER.size != end:
                raise BackupError(f"{path}: not an incremental backup (bad footer)")
            f.seek(off)
            body = f.read(length)
    except OSError as err:
        raise BackupError(f"cannot read {path}: {err.strerror}") from None
    if zlib.crc32(body) != crc:
        raise BackupError(f"{path}: range table checksum mismatch")
    obj = json.loads(body)
    if obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise BackupError(f"{path}: unknown incremental format")
    table = IncTable(
        int(obj["size"]),
        int(obj["block_size"]),
        [(int(o), int(n)) for o, n in obj["data"]],
        [(int(o), int(n)) for o, n in obj["zero"]],
    )
    if table_offset(table.size) != off:
        raise BackupError(f"{path}: table offset does not match the image size")
    for o, n in table.data + table.zero:
        if o < 0 or n <= 0 or o + n > table.size:
            raise BackupError(f"{path}: range ({o}, {n}) outside the image")
    return table
