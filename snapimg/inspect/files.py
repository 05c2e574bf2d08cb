"""Files inside FAT, ext and NTFS filesystems, for ``snapimg ls`` and ``snapimg cat``.

:func:`open_tree` picks the volume (``TARGET:PART`` numbering as ``sfdisk -l``; without a
number the only or first filesystem) and wraps dissect.fat / dissect.extfs /
dissect.ntfs in one small :class:`FileTree` interface.  Library failures on damaged
filesystems become :class:`~snapimg.errors.FilesystemError`: one line, no traceback.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Protocol, TypeVar

from dissect.extfs import ExtFS
from dissect.fat import FATFS
from dissect.ntfs import NTFS

from snapimg.errors import FilesystemError
from snapimg.inspect.filesystems import probe_filesystem
from snapimg.inspect.fsio import open_slice
from snapimg.inspect.partitions import read_partition_table
from snapimg.inspect.source import Source

T = TypeVar("T")


@dataclass(frozen=True)
class FileEntry:
    name: str
    kind: str  # "dir", "file", "symlink", "other"
    size: int
    mtime: datetime | None
    target: str | None = None  # symlink target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "mtime": self.mtime.isoformat() if self.mtime else None,
            "target": self.target,
        }


class FileTree(Protocol):
    fs_type: str

    def stat(self, path: str) -> FileEntry: ...

    def listdir(self, path: str) -> list[FileEntry]: ...

    def open(self, path: str) -> BinaryIO: ...


def _guard(what: str, fn: Callable[[], T]) -> T:
    """Run a library call; missing paths and damage become FilesystemError."""
    try:
        return fn()
    except FilesystemError:
        raise
    except FileNotFoundError:
        raise FilesystemError(f"{what}: no such file or directory") from None
    except NotADirectoryError:
        raise FilesystemError(f"{what}: not a directory") from None
    except Exception as err:  # whatever a damaged filesystem makes the library raise
        raise FilesystemError(f"{what}: damaged filesystem ({type(err).__name__}: {err})") from None


def _norm(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p and p != ".")


class FatTree:
    fs_type = "vfat"

    def __init__(self, fh: BinaryIO) -> None:
        self._fs = _guard("FAT", lambda: FATFS(fh))

    def _get(self, path: str) -> Any:
        return _guard(path, lambda: self._fs.get(_norm(path)))

    @staticmethod
    def _entry(e: Any, name: str | None = None) -> FileEntry:
        is_dir = e.is_directory()
        try:
            mtime = e.mtime
        except Exception:  # an invalid DOS date
            mtime = None
        kind = "dir" if is_dir else "file"
        return FileEntry(name or e.name, kind, 0 if is_dir else int(e.size), mtime)

    def stat(self, path: str) -> FileEntry:
        e = self._get(path)
        return self._entry(e, _norm(path).rsplit("/", 1)[-1] or "/")

    def listdir(self, path: str) -> list[FileEntry]:
        d = self._get(path)
        if not d.is_directory():
            raise FilesystemError(f"{path}: not a directory")
        entries = _guard(path, lambda: list(d.iterdir()))
        return [
            self._entry(e) for e in entries if not e.is_volume_id() and e.name not in (".", "..")
        ]

    def open(self, path: str) -> BinaryIO:
        e = self._get(path)
        if e.is_directory():
            raise FilesystemError(f"{path}: is a directory")
        stream: BinaryIO = _guard(path, e.open)
        return stream


_EXT_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}


class ExtTree:
    fs_type = "ext"

    def __init__(self, fh: BinaryIO) -> None:
        self._fs = _guard("ext", lambda: ExtFS(fh))

    def _get(self, path: str) -> Any:
        return _guard(path, lambda: self._fs.get(_norm(path)))

    @staticmethod
    def _entry(node: Any, name: str) -> FileEntry:
        kind = _EXT_KINDS.get(node.filetype, "other")
        target = node.link if kind == "symlink" else None
        return FileEntry(name, kind, int(node.size), node.mtime, target)

    def stat(self, path: str) -> FileEntry:
        node = self._get(path)
        return _guard(path, lambda: self._entry(node, _norm(path).rsplit("/", 1)[-1] or "/"))

    def listdir(self, path: str) -> list[FileEntry]:
        node = self._get(path)
        if node.filetype != stat.S_IFDIR:
            raise FilesystemError(f"{path}: not a directory")

        def entries() -> Iterator[FileEntry]:
            for child in node.iterdir():
                if child.filename not in (".", ".."):
                    yield self._entry(child, child.filename)

        return _guard(path, lambda: list(entries()))

    def open(self, path: str) -> BinaryIO:
        node = self._get(path)
        if node.filetype == stat.S_IFDIR:
            raise FilesystemError(f"{path}: is a directory")
        if node.filetype != stat.S_IFREG:
            raise FilesystemError(f"{path}: not a regular file")
        stream: BinaryIO = _guard(path, node.open)
        return stream


_NTFS_RESERVED = 16  # MFT records 0-15: $MFT, $Bitmap, ... (hidden, as ntfs-3g does)


class NtfsTree:
    fs_type = "ntfs"

    def __init__(self, fh: BinaryIO) -> None:
        self._fs = _guard("NTFS", lambda: NTFS(fh))

    def _get(self, path: str) -> Any:
        return _guard(path, lambda: self._fs.mft.get(_norm(path)))

    @staticmethod
    def _entry(rec: Any, name: str, mtime: datetime | None) -> FileEntry:
        if rec.is_dir():
            return FileEntry(name, "dir", 0, mtime)
        size = int(rec.size()) if rec.has_stream("") else 0
        return FileEntry(name, "symlink" if rec.is_symlink() else "file", size, mtime)

    def stat(self, path: str) -> FileEntry:
        rec = self._get(path)
        name = _norm(path).rsplit("/", 1)[-1] or "/"
        return _guard(path, lambda: self._entry(rec, name, None))

    def listdir(self, path: str) -> list[FileEntry]:
        rec = self._get(path)
        if not rec.is_dir():
            raise FilesystemError(f"{path}: not a directory")

        def entries() -> Iterator[FileEntry]:
            for e in rec.iterdir(ignore_dos=True):
                child = e.dereference()
                name = e.attribute.file_name
                if child.segment < _NTFS_RESERVED or name == ".":
                    continue
                yield self._entry(child, name, e.attribute.last_modification_time)

        return _guard(path, lambda: list(entries()))

    def open(self, path: str) -> BinaryIO:
        rec = self._get(path)
        if rec.is_dir():
            raise FilesystemError(f"{path}: is a directory")
        stream: BinaryIO = _guard(path, rec.open)
        return stream


def select_volume(src: Source, part: int | None) -> tuple[int, int, str]:
    """(offset, size, description) of partition ``part``, or of the only/first filesystem."""
    table, _ = read_partition_table(src)
    if table is None:
        if part is not None:
            raise FilesystemError(f"{src.name} has no partition table: drop the :{part}")
        return 0, src.size, "disk"
    if part is not None:
        for p in table.partitions:
            if p.index == part:
                return p.start, p.size, f"partition {part}"
        numbers = ", ".join(str(p.index) for p in table.partitions) or "none"
        raise FilesystemError(f"{src.name} has no partition {part} (partitions: {numbers})")
    for p in table.partitions:
        if not p.container:
            fs, _ = probe_filesystem(src, p.start, p.size, f"partition {p.index}")
            if fs is not None and fs.type in ("vfat", "ext2", "ext3", "ext4", "ntfs"):
                return p.start, p.size, f"partition {p.index}"
    raise FilesystemError(f"{src.name}: no FAT, ext or NTFS filesystem in any partition")


def open_tree(src: Source, part: int | None) -> FileTree:
    offset, size, where = select_volume(src, part)
    fs, findings = probe_filesystem(src, offset, size, where)
    if fs is None:
        why = f": {findings[0].message}" if findings else ""
        raise FilesystemError(f"{src.name}: no filesystem recognised in {where}{why}")
    fh = open_slice(src, offset, size)
    if fs.type == "vfat":
        return FatTree(fh)
    if fs.type in ("ext2", "ext3", "ext4"):
        return ExtTree(fh)
    if fs.type == "ntfs":
        return NtfsTree(fh)
    raise FilesystemError(f"{src.name}: {where} holds {fs.type}; ls and cat cannot read it")
