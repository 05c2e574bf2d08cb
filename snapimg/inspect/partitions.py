"""MBR (with extended/logical partitions) and GPT partition tables, read and checked.

Numbering follows ``sfdisk -l``: MBR primaries 1-4 by slot, logical partitions from 5 in
EBR-chain order; GPT entries by their slot in the entry array.  Everything odd or damaged
(bad CRCs, a missing backup GPT, partitions past the end of the disk or overlapping, EBR
loops) becomes a :class:`~snapimg.inspect.findings.Finding`; parsing never raises on bad
on-disk data.  Why not a library: see docs/inspect.md ("Dependencies").
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from snapimg.errors import DeviceError
from snapimg.inspect.findings import Finding
from snapimg.inspect.source import Source

SECTOR = 512
_EXTENDED = (0x05, 0x0F, 0x85)
_GPT_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128

# Names as fdisk/sfdisk print them for the common types.
MBR_TYPE_NAMES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Ext'd (LBA)",
    0x82: "Linux swap / Solaris",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xEE: "GPT",
    0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}
GPT_TYPE_NAMES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
}


@dataclass(frozen=True)
class Partition:
    index: int
    start: int
    size: int
    type: str  # MBR: "0x83"; GPT: the type GUID, upper case as sfdisk prints it
    type_name: str | None
    bootable: bool
    name: str | None = None  # GPT partition name
    uuid: str | None = None  # GPT unique partition GUID
    container: bool = False  # an MBR extended partition (holds logical ones, no filesystem)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start": self.start,
            "size": self.size,
            "type": self.type,
            "type_name": self.type_name,
            "bootable": self.bootable,
            "name": self.name,
            "uuid": self.uuid,
            "container": self.container,
        }


@dataclass
class PartitionTable:
    kind: Literal["mbr", "gpt"]
    id: str  # MBR disk signature "0x1234abcd" / GPT disk GUID
    sector_size: int
    partitions: list[Partition] = field(default_factory=list)


def read_partition_table(src: Source) -> tuple[PartitionTable | None, list[Finding]]:
    """The disk's partition table (None: there is none) and what is wrong with it."""
    findings: list[Finding] = []
    if src.size < SECTOR:
        return None, findings
    mbr = src.pread(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        return None, findings
    entries = [_mbr_entry(mbr, i) for i in range(4)]
    if any(e[0] not in (0x00, 0x80) for e in entries):
        return None, findings  # boot code or a filesystem boot sector, not a partition table
    if not any(e[1] and e[3] for e in entries):
        return None, findings  # a filesystem boot sector (superfloppy) or an empty table
    if any(e[1] == _GPT_PROTECTIVE for e in entries):
        gpt = _read_gpt(src, findings)
        if gpt is not None:
            _check_layout(src, gpt, findings)
            return gpt, findings
        findings.append(Finding("warning", "disk", "protective MBR without a usable GPT"))
    table = _read_mbr(src, mbr, entries, findings)
    _check_layout(src, table, findings)
    return table, findings


def _mbr_entry(sector: bytes, slot: int) -> tuple[int, int, int, int]:
    """(boot flag, type, start LBA, sector count) of partition entry ``slot``."""
    off = 446 + 16 * slot
    lba, count = struct.unpack_from("<II", sector, off + 8)
    return sector[off], sector[off + 4], lba, count


def _mbr_partition(index: int, boot: int, ptype: int, start_lba: int, count: int) -> Partition:
    return Partition(
        index=index,
        start=start_lba * SECTOR,
        size=count * SECTOR,
        type=f"0x{ptype:02x}",
        type_name=MBR_TYPE_NAMES.get(ptype),
        bootable=boot == 0x80,
        container=ptype in _EXTENDED,
    )


def _read_mbr(
    src: Source, mbr: bytes, entries: list[tuple[int, int, int, int]], findings: list[Finding]
) -> PartitionTable:
    table = PartitionTable("mbr", f"0x{struct.unpack_from('<I', mbr, 440)[0]:08x}", SECTOR)
    for slot, (boot, ptype, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        table.partitions.append(_mbr_partition(slot + 1, boot, ptype, lba, count))
        if ptype in _EXTENDED:
            table.partitions.extend(_read_logical(src, lba, findings))
    return table


def _read_logical(src: Source, ext_lba: int, findings: list[Finding]) -> list[Partition]:
    """Follow the EBR chain of the extended partition at ``ext_lba``."""
    found: list[Partition] = []
    ebr_lba, seen = ext_lba, set()
    while len(found) < _MAX_LOGICAL:
        where = f"EBR at sector {ebr_lba}"
        if ebr_lba in seen:
            findings.append(Finding("error", where, "EBR chain loops back on itself"))
            break
        seen.add(ebr_lba)
        if (ebr_lba + 1) * SECTOR > src.size:
            findings.append(Finding("error", where, "beyond the end of the disk"))
            break
        ebr = src.pread(ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            findings.append(Finding("error", where, "no boot signature: logical partitions lost"))
            break
        boot, ptype, lba, count = _mbr_entry(ebr, 0)
        if ptype and count:
            found.append(_mbr_partition(5 + len(found), boot, ptype, ebr_lba + lba, count))
        _, next_type, next_lba, next_count = _mbr_entry(ebr, 1)
        if not next_type or not next_count:
            break
        ebr_lba = ext_lba + next_lba
    return found


_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")


def _read_gpt(src: Source, findings: list[Finding]) -> PartitionTable | None:
    for sector in (SECTOR, 4096):
        primary = _gpt_header(src, sector, 1, findings, "primary")
        last_lba = src.size // sector - 1
        backup_lba = primary["alternate"] if primary else last_lba
        backup = _gpt_header(src, sector, backup_lba, findings, "backup") if backup_lba else None
        header = primary or backup
        if header is None:
            continue
        if primary and primary["alternate"] != last_lba:
            findings.append(
                Finding(
                    "warning",
                    "disk",
                    f"the GPT was made for a disk of {primary['alternate'] + 1} sectors; "
                    f"this one has {last_lba + 1}",
                )
            )
        if primary and not backup:
            findings.append(Finding("warning", "disk", "backup GPT header missing or damaged"))
        elif backup and not primary:
            findings.append(
                Finding("error", "disk", "primary GPT header damaged: using the backup")
            )
        return _gpt_entries(src, sector, header, findings)
    return None


def _gpt_header(
    src: Source, sector: int, lba: int, findings: list[Finding], which: str
) -> dict[str, Any] | None:
    if (lba + 1) * sector > src.size:
        return None
    raw = src.pread(lba * sector, sector)
    fields = _GPT_HEADER.unpack_from(raw)
    sig, _rev, hsize, crc = fields[0], fields[1], fields[2], fields[3]
    if sig != b"EFI PART":
        return None
    if not 92 <= hsize <= sector:
        findings.append(Finding("error", "disk", f"{which} GPT header: bad header size {hsize}"))
        return None
    zeroed = raw[:16] + b"\0\0\0\0" + raw[20:hsize]
    if zlib.crc32(zeroed) != crc:
        findings.append(Finding("error", "disk", f"{which} GPT header: CRC mismatch"))
        return None
    return {
        "alternate": fields[6],
        "first_usable": fields[7],
        "last_usable": fields[8],
        "disk_guid": str(uuid.UUID(bytes_le=fields[9])).upper(),
        "entries_lba": fields[10],
        "count": fields[11],
        "entry_size": fields[12],
        "entries_crc": fields[13],
    }


def _gpt_entries(
    src: Source, sector: int, header: dict[str, Any], findings: list[Finding]
) -> PartitionTable:
    table = PartitionTable("gpt", header["disk_guid"], sector)
    count, esize = header["count"], header["entry_size"]
    if esize < 128 or count > 4096 or esize * count > 4 << 20:
        findings.append(Finding("error", "disk", f"GPT entry array: bad geometry {count}x{esize}"))
        return table
    try:
        raw = src.pread(header["entries_lba"] * sector, count * esize)
    except DeviceError as err:
        findings.append(Finding("error", "disk", f"GPT entry array unreadable: {err}"))
        return table
    if zlib.crc32(raw) != header["entries_crc"]:
        findings.append(Finding("error", "disk", "GPT entry array: CRC mismatch"))
    for slot in range(count):
        e = raw[slot * esize : slot * esize + 128]
        if e[:16] == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        type_guid = str(uuid.UUID(bytes_le=e[:16])).upper()
        name = e[56:128].decode("utf-16-le", errors="replace").split("\0")[0]
        if last < first:
            findings.append(Finding("error", f"partition {slot + 1}", "ends before it starts"))
            continue
        table.partitions.append(
            Partition(
                index=slot + 1,
                start=first * sector,
                size=(last - first + 1) * sector,
                type=type_guid,
                type_name=GPT_TYPE_NAMES.get(type_guid),
                bootable=bool(attrs & 4),  # "legacy BIOS bootable"
                name=name,
                uuid=str(uuid.UUID(bytes_le=e[16:32])).upper(),
            )
        )
    return table


def _check_layout(src: Source, table: PartitionTable, findings: list[Finding]) -> None:
    """Partitions past the end of the disk, and partitions that overlap each other."""
    for p in table.partitions:
        if p.start == 0:
            findings.append(Finding("error", f"partition {p.index}", "starts at sector 0"))
        if p.start + p.size > src.size:
            findings.append(
                Finding("error", f"partition {p.index}", "extends beyond the end of the disk")
            )
    plain = sorted((p for p in table.partitions if not p.container), key=lambda p: p.start)
    for a, b in zip(plain, plain[1:], strict=False):
        if b.start < a.start + a.size:
            findings.append(
                Finding("error", f"partition {b.index}", f"overlaps partition {a.index}")
            )
