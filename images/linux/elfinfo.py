"""Just enough of ELF64 (little-endian) to build the guest without host tools.

Two questions are answered: which shared libraries a program needs (DT_NEEDED), and what a kernel
module's ``.modinfo`` section says (``depends=``, ``softdep=``, ``alias=``).  The kernel package
ships no modules.dep (depmod runs in its postinst) and a fresh host has neither depmod nor readelf.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_DT_NEEDED = 1
_SHT_DYNAMIC = 6


class ElfError(ValueError):
    """The file is not a little-endian ELF64 file this module understands."""


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def _cstring(data: bytes | mmap.mmap, start: int) -> str:
    return data[start:data.find(b"\0", start)].decode(errors="replace")


def _sections(data: bytes | mmap.mmap) -> list[tuple[str, int, int, int, int]]:
    """(name, type, offset, size, link) of every section."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, kind, _flags, _addr, offset, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize)
        raw.append((name, kind, offset, size, link))
    str_offset = raw[shstrndx][2]
    return [(_cstring(data, str_offset + name), kind, offset, size, link)
            for name, kind, offset, size, link in raw]


def needed_libraries(data: bytes) -> list[str]:
    """The DT_NEEDED entries of a dynamically linked program or library (empty if static)."""
    sections = _sections(data)
    for _name, kind, offset, size, link in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strtab = sections[link][2]
        names = []
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == _DT_NEEDED:
                names.append(_cstring(data, strtab + value))
        return names
    return []


def modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value strings of a kernel module's .modinfo section, grouped by key."""
    # mapped, not read: only the headers and the section are touched (4000 modules, 390 MB)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, _kind, offset, size, _link in _sections(data):
            if name == ".modinfo":
                info: dict[str, list[str]] = {}
                for item in data[offset:offset + size].split(b"\0"):
                    key, sep, value = item.decode(errors="replace").partition("=")
                    if sep:
                        info.setdefault(key, []).append(value)
                return info
    raise ElfError(f"{path}: no .modinfo section")
