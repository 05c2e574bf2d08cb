"""From recorded calls to a timeline of persistence events, and the crash points on it.

Files are identified by a file id (fid): an inode number gets a new fid whenever a
recorded call creates a file with it.  Each event says what a crash state may contain of
one call:

* :class:`Data` -- a write, as the *post-write images of the 512-byte sectors it
  touched* (the page cache merges overlapping writes, so a sector on disk always holds
  one of its successive contents, never a later write without an earlier one);
* :class:`Zero`, :class:`Resize`, :class:`Grow` -- fallocate and truncate (atomic);
* :class:`Names` -- a directory change (create, rename, unlink: atomic);
* :class:`Barrier` -- fsync/fdatasync of one file or directory, or sync().

At crash point *k* (the first *k* events completed) each file's events up to its last
barrier are durable; the later ones (*pending*) may each have reached the disk or not,
writes torn at sector granularity; pending directory changes of a directory reach it as
a prefix (file systems journal name changes in order), and only a directory fsync makes
them durable (POSIX: fsync of a file does not persist its name).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from reliability.crash import recording as rec
from reliability.crash.images import SECTOR, Image

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ALL = -1  # Barrier fid of sync()


@dataclass(frozen=True)
class Data:
    fid: int
    start: int  # sector aligned
    blob: bytes  # post-write content of the sectors [start, start + len(blob))
    end: int  # the write's end: the file grows to it
    dsync: bool = False  # O_DSYNC/RWF_DSYNC: durable once it returned

    def apply(self, img: Image, sectors: frozenset[int] | None = None) -> None:
        if sectors is None:
            img.place(self.start, self.blob, self.end)
            return
        img.size = max(img.size, self.end)
        for s in sorted(sectors):
            lo = s * SECTOR
            img.place(self.start + lo, self.blob[lo : lo + SECTOR], self.end)

    @property
    def sectors(self) -> int:
        return len(self.blob) // SECTOR


@dataclass(frozen=True)
class Zero:
    fid: int
    offset: int
    length: int
    grow: bool

    def apply(self, img: Image) -> None:
        if self.grow:
            img.size = max(img.size, self.offset + self.length)
        img.zero(self.offset, self.length)


@dataclass(frozen=True)
class Resize:
    fid: int
    size: int

    def apply(self, img: Image) -> None:
        img.truncate(self.size)


@dataclass(frozen=True)
class Grow:
    fid: int
    size: int

    def apply(self, img: Image) -> None:
        img.size = max(img.size, self.size)


@dataclass(frozen=True)
class Names:
    """Directory ``fid`` changes: ``remove`` names go, then ``add`` names point to fids."""

    fid: int
    remove: tuple[str, ...]
    add: tuple[tuple[str, int], ...]

    def apply(self, entries: dict[str, int]) -> None:
        for name in self.remove:
            entries.pop(name, None)
        for name, fid in self.add:
            entries[name] = fid


@dataclass(frozen=True)
class Barrier:
    fid: int  # ALL: every file and directory


FileEvent = Data | Zero | Resize | Grow
Event = FileEvent | Names | Barrier


@dataclass
class Timeline:
    events: list[Event] = field(default_factory=list)
    marks: list[tuple[int, str]] = field(default_factory=list)  # (crash point, text)
    images: dict[int, Image] = field(default_factory=dict)  # initial file contents
    dirs: dict[int, dict[str, int]] = field(default_factory=dict)  # initial entries
    final: dict[int, Image] = field(default_factory=dict)  # contents after every event
    final_dirs: dict[int, dict[str, int]] = field(default_factory=dict)


def build(ops: list[rec.Op], files: dict[int, bytes], dirs: dict[int, dict[str, int]]) -> Timeline:
    """The timeline of a recording.  ``files``: inode -> content of the files that existed
    before it (they keep their inode number as fid); ``dirs``: inode -> entries (name ->
    inode) of the directories that existed, the recorded root among them."""
    tl = Timeline()
    fid_of: dict[int, int] = {}
    next_fid = 1 << 40  # above any inode number
    for ino, data in files.items():
        fid_of[ino] = ino
        tl.images[ino] = Image.of(data)
    for ino, entries in dirs.items():
        fid_of[ino] = ino
        tl.dirs[ino] = dict(entries)
    live = {fid: img.copy() for fid, img in tl.images.items()}
    live_dirs = {fid: dict(e) for fid, e in tl.dirs.items()}

    def fid(ino: int) -> int:
        f = fid_of.get(ino)
        if f is None:
            raise rec.RecorderError(f"recording touches inode {ino} it never created")
        return f

    for op in ops:
        if isinstance(op, rec.Mark):
            tl.marks.append((len(tl.events), op.text))
        elif isinstance(op, rec.Unsupported):
            raise rec.RecorderError(f"the workload did what the explorer cannot model: {op.text}")
        elif isinstance(op, rec.Write):
            f = fid(op.ino)
            img = live[f]
            img.write(op.offset, op.data)
            start = op.offset // SECTOR * SECTOR
            end = op.offset + len(op.data)
            stop = -(-end // SECTOR) * SECTOR
            tl.events.append(Data(f, start, img.read(start, stop - start), end, op.dsync))
        elif isinstance(op, rec.Fallocate):
            f = fid(op.ino)
            mode = op.mode
            ev: Event
            if mode == 0:
                ev = Grow(f, op.offset + op.length)
            elif mode == FALLOC_FL_KEEP_SIZE:
                continue
            elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                ev = Zero(f, op.offset, op.length, False)
            elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
                ev = Zero(f, op.offset, op.length, not mode & FALLOC_FL_KEEP_SIZE)
            else:
                raise rec.RecorderError(f"fallocate mode {mode:#x} is not modelled")
            ev.apply(live[f])
            tl.events.append(ev)
        elif isinstance(op, rec.Truncate):
            f = fid(op.ino)
            live[f].truncate(op.size)
            tl.events.append(Resize(f, op.size))
        elif isinstance(op, rec.Sync):
            tl.events.append(Barrier(fid(op.ino)))
        elif isinstance(op, rec.SyncAll):
            tl.events.append(Barrier(ALL))
        elif isinstance(op, rec.Create):
            new = next_fid
            next_fid += 1
            fid_of[op.ino] = new
            if op.is_dir:
                live_dirs[new] = {}
                tl.dirs[new] = {}
            else:
                live[new] = Image()
                tl.images[new] = Image()
            ev = Names(fid(op.parent), (), ((op.name, new),))
            ev.apply(live_dirs[ev.fid])
            tl.events.append(ev)
        elif isinstance(op, rec.Rename):
            if op.flags or op.old_parent != op.new_parent:
                raise rec.RecorderError("only plain renames within one directory are modelled")
            ev = Names(fid(op.old_parent), (op.old_name,), ((op.new_name, fid(op.ino)),))
            ev.apply(live_dirs[ev.fid])
            tl.events.append(ev)
        elif isinstance(op, rec.Unlink):
            ev = Names(fid(op.parent), (op.name,), ())
            ev.apply(live_dirs[ev.fid])
            tl.events.append(ev)
    tl.final = live
    tl.final_dirs = live_dirs
    return tl


@dataclass
class CrashPoint:
    """What a crash after the first ``k`` events may leave: durable contents (shared,
    never mutate them) plus each file's and directory's pending events."""

    k: int
    images: dict[int, Image]
    dirs: dict[int, dict[str, int]]
    pending: dict[int, list[FileEvent]]
    pending_names: dict[int, list[Names]]


def sweep(tl: Timeline) -> Iterator[CrashPoint]:
    """Every crash point of the timeline, in order."""
    images = dict(tl.images)
    dirs = {f: dict(e) for f, e in tl.dirs.items()}
    pending: dict[int, list[FileEvent]] = {}
    names: dict[int, list[Names]] = {}

    def settle(fid: int) -> None:
        if fid in pending:
            img = images[fid].copy()
            for ev in pending.pop(fid):
                ev.apply(img)
            images[fid] = img
        if fid in names:
            entries = dict(dirs[fid])
            for nev in names.pop(fid):
                nev.apply(entries)
            dirs[fid] = entries

    for k in range(len(tl.events) + 1):
        yield CrashPoint(
            k, dict(images), dict(dirs),
            {f: list(p) for f, p in pending.items()}, {f: list(n) for f, n in names.items()},
        )  # fmt: skip
        if k == len(tl.events):
            break
        ev = tl.events[k]
        if isinstance(ev, Barrier):
            for f in list(pending) + list(names) if ev.fid == ALL else [ev.fid]:
                settle(f)
        elif isinstance(ev, Names):
            names.setdefault(ev.fid, []).append(ev)
            if ev.fid not in dirs:
                dirs[ev.fid] = {}
        else:
            pending.setdefault(ev.fid, []).append(ev)
            if ev.fid not in images:
                images[ev.fid] = Image()
