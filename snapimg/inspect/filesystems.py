"""What filesystem is in a byte range: type as blkid names it, variant, label, UUID, size, used.

Parsing is done by the dissect libraries (dissect.fat, dissect.extfs, dissect.ntfs: see
docs/inspect.md, "Dependencies"); this module only turns their answers into blkid's
vocabulary (``vfat`` + ``FAT16``, ``ext2``/``ext3``/``ext4``, ``ntfs``) and counts free
space from the filesystem's own allocation map.  A damaged filesystem is a finding.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from dissect.extfs import ExtFS
from dissect.fat import FATFS
from dissect.ntfs import NTFS

from snapimg.inspect.findings import Finding
from snapimg.inspect.fsio import open_slice
from snapimg.inspect.source import Source

# ext2/3 feature bits (linux/fs/ext4/ext4.h); blkid calls a filesystem ext4 as soon as it
# uses a feature outside what ext3 supports, ext3 when it has a journal.
_EXT3_COMPAT_HAS_JOURNAL = 0x0004
_EXT3_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
_EXT3_INCOMPAT_SUPP = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg
_EXT4_INCOMPAT_64BIT = 0x0080


@dataclass(frozen=True)
class FsInfo:
    type: str  # blkid's TYPE: vfat, ext2, ext3, ext4, ntfs
    variant: str | None  # FAT12 / FAT16 / FAT32 (blkid's VERSION for vfat), else None
    label: str | None
    uuid: str | None  # formatted as blkid prints it
    size: int  # bytes the filesystem spans
    free: int | None  # bytes in free allocation units (None: could not be counted)
    block_size: int  # allocation unit: cluster or block

    @property
    def used(self) -> int | None:
        return None if self.free is None else self.size - self.free

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "variant": self.variant,
            "label": self.label,
            "uuid": self.uuid,
            "size": self.size,
            "used": self.used,
            "free": self.free,
            "block_size": self.block_size,
        }


def probe_filesystem(
    src: Source, offset: int, size: int, where: str
) -> tuple[FsInfo | None, list[Finding]]:
    """Identify the filesystem in ``[offset, offset+size)``; None when there is none."""
    findings: list[Finding] = []
    head = src.pread(offset, min(4096, size, src.size - offset)) if size > 0 else b""
    if len(head) < 2048:
        return None, findings
    fh = open_slice(src, offset, size)
    kind = _signature(head)
    if kind is None:
        return None, findings
    try:
        info = {"ntfs": _ntfs_info, "ext": _ext_info, "fat": _fat_info}[kind](fh)
    except Exception as err:  # a damaged filesystem is a finding, whatever the library raised
        findings.append(Finding("error", where, f"damaged {kind} filesystem: {_describe(err)}"))
        return None, findings
    if info.size > size:
        findings.append(
            Finding("error", where, f"{info.type} filesystem is larger than its partition")
        )
    return info, findings


def _signature(head: bytes) -> str | None:
    """Which library to ask; each then validates the rest of its own superblock."""
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if (
        head[510:512] == b"\x55\xaa"
        and head[0] in (0xEB, 0xE9)
        and (b"FAT" in head[54:62] or b"FAT32" in head[82:90] or head[13] != 0)
    ):
        return "fat"
    return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def open_fat(fh: BinaryIO) -> FATFS:
    return FATFS(fh)


def _fat_info(fh: BinaryIO) -> FsInfo:
    fs = open_fat(fh)
    variant = fs.type.name  # Fattype.FAT12 / FAT16 / FAT32
    bpb = fs.bpb
    label: str | None = None
    for entry in fs.root.iterdir():  # the root directory's volume label entry wins, as in blkid
        if entry.is_volume_id() and entry.dirent.DIR_Attr & 0x0F != 0x0F:  # not an LFN
            label = bytes(entry.dirent.DIR_Name).decode(fs.encoding).rstrip(" ")
            break
    if label is None and fs.volume_label not in ("", "NO NAME"):
        label = fs.volume_label
    serial = int(fs.bpb_ext.BS_VolID)
    clusters = (fs.total_sectors - fs.first_data_sector) // bpb.BPB_SecPerClus
    fh.seek(bpb.BPB_RsvdSecCnt * fs.sector_size)
    table = fh.read(fs.fat_size * fs.sector_size)
    free_clusters = _fat_free(table, variant, clusters)
    return FsInfo(
        type="vfat",
        variant=variant,
        label=label or None,
        uuid=f"{serial >> 16:04X}-{serial & 0xFFFF:04X}",
        size=fs.total_sectors * fs.sector_size,
        free=free_clusters * fs.cluster_size,
        block_size=fs.cluster_size,
    )


def _fat_free(table: bytes, variant: str, clusters: int) -> int:
    """Free entries among clusters 2 .. clusters+1 of one FAT."""
    end = clusters + 2
    if variant == "FAT12":
        free = 0
        for n in range(2, end):
            off = n + n // 2
            v = int.from_bytes(table[off : off + 2], "little")
            free += (v >> 4 if n & 1 else v & 0xFFF) == 0
        return free
    typecode = "H" if variant == "FAT16" else "I"
    width = 2 if typecode == "H" else 4
    entries = array.array(typecode, table[2 * width : end * width])
    if sys.byteorder != "little":
        entries.byteswap()
    if typecode == "H":
        return entries.count(0)
    return sum(1 for v in entries if not v & 0x0FFFFFFF)


def _ext_info(fh: BinaryIO) -> FsInfo:
    fs = ExtFS(fh)
    sb = fs.sb
    beyond_ext3 = sb.s_feature_incompat & ~_EXT3_INCOMPAT_SUPP
    if beyond_ext3 or sb.s_feature_ro_compat & ~_EXT3_RO_COMPAT_SUPP:
        fstype = "ext4"
    elif sb.s_feature_compat & _EXT3_COMPAT_HAS_JOURNAL:
        fstype = "ext3"
    else:
        fstype = "ext2"
    free_blocks = 0
    wide = bool(sb.s_feature_incompat & _EXT4_INCOMPAT_64BIT)
    for group in range(fs.groups_count):  # group descriptors: fresher than the superblock count
        desc = fs._read_group_desc(group)
        free_blocks += desc.bg_free_blocks_count_lo
        if wide and hasattr(desc, "bg_free_blocks_count_hi"):
            free_blocks += desc.bg_free_blocks_count_hi << 16
    return FsInfo(
        type=fstype,
        variant=None,
        label=fs.volume_name or None,
        uuid=str(fs.uuid),
        size=fs.block_count * fs.block_size,
        free=free_blocks * fs.block_size,
        block_size=fs.block_size,
    )


def _ntfs_info(fh: BinaryIO) -> FsInfo:
    fs = NTFS(fh)
    boot = fs.boot_sector
    size = int(boot.NumberSectors) * fs.sector_size
    clusters = size // fs.cluster_size
    bitmap = fs.mft.get("$Bitmap").open().read((clusters + 7) // 8)
    bits = int.from_bytes(bitmap, "little") & ((1 << clusters) - 1)  # padding bits are set
    used_clusters = bits.bit_count()
    free = max(0, clusters - used_clusters) * fs.cluster_size
    return FsInfo(
        type="ntfs",
        variant=None,
        label=fs.volume_name or None,
        uuid=f"{int(boot.SerialNumber):016X}",
        size=size,
        free=free,
        block_size=fs.cluster_size,
    )
