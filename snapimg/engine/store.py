"""The preservation store: a data area of block slots plus a record log.

:class:`FileStore` keeps them in a store directory (``store.meta``: header + log;
``store.data``: slots; ``store.lock``: held while open), format in
docs/store-format.md.  :class:`RamStore` keeps slots in memory and logs nothing.
Both raise OSError from the underlying I/O; the engine turns that into policy.
An optional ``fault`` callable (tests) is called with "data", "log" or "sync" before
each such operation and may raise OSError to simulate a failing file system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from snapimg.engine import records
from snapimg.engine.slots import SlotAllocator, merge_slots
from snapimg.errors import StoreError, StoreFormatError
from snapimg.fileio import fallocate, fsync_dir, write_zeroes_fd

MAGIC = b"SNAPIMG\x00"
VERSION = 1
HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sII16sIBB40sQ")
META, DATA, LOCK = "store.meta", "store.data", "store.lock"
LOG_RESERVE = 1 << 20
COMPACT_AFTER = 64 << 20  # log bytes after which a lifecycle change compacts the log
DATA_RESERVE = 64 << 20

Fault = Callable[[str], None]


@dataclass(frozen=True)
class Header:
    uuid: bytes
    block_size: int
    clean: bool
    strict: bool  # durability mode of the session that wrote it
    boot_id: str
    checkpoint_len: int

    def encode(self) -> bytes:
        head = _HEADER.pack(
            MAGIC, VERSION, HEADER_SIZE, self.uuid, self.block_size, self.clean, self.strict,
            self.boot_id.encode(), self.checkpoint_len,
        )  # fmt: skip
        head += struct.pack("<I", zlib.crc32(head))
        return head.ljust(HEADER_SIZE, b"\0")

    @classmethod
    def decode(cls, buf: bytes, where: Path) -> Header:
        if len(buf) < _HEADER.size + 4:
            raise StoreFormatError(f"store {where} is truncated (no complete header)")
        magic, version, hsize, uid, bs, clean, strict, boot, cplen = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise StoreFormatError(f"{where} is not a snapimg store (bad magic)")
        if version != VERSION:
            raise StoreFormatError(
                f"store {where} has format version {version}; this snapimg reads {VERSION}"
            )
        (crc,) = struct.unpack_from("<I", buf, _HEADER.size)
        if crc != zlib.crc32(buf[: _HEADER.size]) or hsize != HEADER_SIZE:
            raise StoreFormatError(f"store {where} has a corrupted header (checksum mismatch)")
        return cls(uid, bs, bool(clean), bool(strict), boot.rstrip(b"\0").decode(), cplen)


@dataclass
class Loaded:
    """What an existing store holds, read without changing anything."""

    header: Header
    checkpoint: list[records.Record]
    tail: list[records.Record]
    data_slots: int


def read_store(path: Path, same_boot: bool = True, boot_id: str | None = None) -> Loaded | None:
    """Parse the store in ``path`` (None when there is none yet), changing nothing.

    ``same_boot``: the store was last open in this boot (a bad log record followed by
    intact ones is then corruption); with ``boot_id`` given, the header decides."""
    meta, data = path / META, path / DATA
    if not meta.exists():
        # An empty data file without a meta file is what a crash during the very first
        # open leaves (the data file is created first): there is no store yet.
        if data.exists() and data.stat().st_size:
            raise StoreFormatError(f"store {path} has {DATA} but no {META}")
        return None
    buf = meta.read_bytes()
    header = Header.decode(buf[:HEADER_SIZE], meta)
    if boot_id is not None:
        same_boot = header.clean or header.boot_id == boot_id
    if not data.exists():
        raise StoreFormatError(f"store {path} has no {DATA}")
    cp_end = HEADER_SIZE + header.checkpoint_len
    if len(buf) < cp_end:
        raise StoreFormatError(f"store {meta} is truncated (checkpoint incomplete)")
    view = memoryview(buf)
    checkpoint: list[records.Record] = []
    pos = HEADER_SIZE
    while pos < cp_end:
        got = records.decode_at(view[:cp_end], pos)
        if got is None:
            raise StoreFormatError(f"store {meta} is corrupted (checkpoint record at {pos})")
        rec, pos = got
        checkpoint.append(rec)
    tail: list[records.Record] = []
    while True:
        got = records.decode_at(view, pos)
        if got is None:
            break
        rec, pos = got
        tail.append(rec)
    # A killed process leaves at most one torn append at the end of the log, so an
    # intact record after the first bad one means corruption, unless the host went down
    # (then unsynced log pages may be missing in any order).
    if same_boot and _intact_record_after(buf, pos + 1):
        raise StoreFormatError(f"store {meta} is corrupted (bad log record at byte {pos})")
    bs = header.block_size
    data_slots = (os.stat(data).st_size + bs - 1) // bs
    return Loaded(header, checkpoint, tail, data_slots)


_NONZERO = re.compile(rb"[^\x00]")
_ZERO_PIECE = bytes(1 << 16)


def _intact_record_after(buf: bytes, start: int, scan: int = 1 << 20) -> bool:
    """Whether an intact record starts somewhere in ``buf[start:start+scan]``."""
    view = memoryview(buf)
    end = min(len(buf), start + scan)
    # a record starts at a non-zero byte: none after the last one (the reserved log space
    # is zeroes, skipped here by memcmp of 64 KiB pieces: a regex scan took 8 ms per MiB)
    while end - start >= len(_ZERO_PIECE) and buf[end - len(_ZERO_PIECE) : end] == _ZERO_PIECE:
        end -= len(_ZERO_PIECE)
    end = start + len(buf[start:end].rstrip(b"\0"))
    pos = start
    while True:
        m = _NONZERO.search(buf, pos, end)
        if m is None:
            return False
        pos = m.start()
        if records.decode_at(view, pos) is not None:
            return True
        pos += 1


def make_dir_durable(path: Path) -> None:
    """``mkdir -p path``; every directory it creates is made durable in its parent (a
    new name survives power loss only after its directory was fsynced)."""
    missing = []
    up = path
    while not up.exists():
        missing.append(up)
        up = up.parent
    path.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):
        fsync_dir(made.parent)


class Store:
    """Slots and log; subclasses do the I/O.

    Freed slots wait in ``pending`` until :meth:`reclaim` has given their space back
    (hole punch: slow where the file system discards synchronously), which the engine
    calls outside its locks; only then can they be allocated again.
    """

    def __init__(self, block_size: int, fault: Fault | None) -> None:
        self.block_size = block_size
        self.fault = fault
        self.slots = SlotAllocator()
        self.appended = 0  # records appended (sequence for group commit)
        self.pending: list[tuple[int, int]] = []  # freed runs not yet reclaimed
        self._append_lock = threading.Lock()
        self._slot_lock = threading.Lock()
        self.on_pending: Callable[[], None] | None = None  # freed slots wait for reclaim

    def alloc(self, n: int) -> list[tuple[int, int]]:
        with self._slot_lock:
            runs = self.slots.alloc(n)
            self._grown()
            return runs

    def free(self, slots: Iterable[int]) -> None:
        self.free_runs(merge_slots(list(slots)))

    def free_runs(self, runs: Iterable[tuple[int, int]]) -> None:
        runs = list(runs)
        if runs:
            with self._slot_lock:
                self.pending.extend(runs)
            if self.on_pending is not None:
                self.on_pending()

    def wants_checkpoint(self) -> bool:
        """True when the log has grown enough to be worth compacting now."""
        return False

    def reclaim(self) -> None:
        """Give the space of freed slots back, then make them allocatable."""
        with self._slot_lock:
            runs, self.pending = self.pending, []
        if not runs:
            return
        for start, count in runs:
            self._punch(start, count)
        with self._slot_lock:
            for start, count in runs:
                self.slots.free(start, count)
            self._shrunk()

    def write_slots(self, slot: int, data: bytes | bytearray | memoryview, within: int = 0) -> None:
        if self.fault:
            self.fault("data")
        self._write(slot * self.block_size + within, data)

    def append(self, blob: bytes) -> int:
        """Append records to the log; returns the sequence number to sync up to."""
        with self._append_lock:
            if self.fault:
                self.fault("log")
            self._append(blob)
            self.appended += 1
            return self.appended

    def sync_upto(self, seq: int) -> None:
        """Make everything appended up to ``seq`` durable (strict mode)."""
        self.sync()

    # subclass hooks
    def read_slots(self, slot: int, nbytes: int, within: int = 0) -> bytes:
        """``nbytes`` from byte ``within`` of ``slot`` on (crossing into the next slots)."""
        raise NotImplementedError

    def sync(self) -> None:
        pass

    def _write(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _append(self, blob: bytes) -> None:
        pass

    def _punch(self, start: int, count: int) -> None:
        pass

    def _grown(self) -> None:
        """The allocator's end may have grown (``_slot_lock`` held)."""

    def _shrunk(self) -> None:
        """The allocator's end may have shrunk (``_slot_lock`` held)."""

    def checkpoint(self, blob: bytes, clean: bool) -> None:
        pass

    def close(self) -> None:
        pass


class RamStore(Store):
    """Slots in memory: tests and throwaway snapshots."""

    def __init__(self, block_size: int, fault: Fault | None = None) -> None:
        super().__init__(block_size, fault)
        self._blocks: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def _write(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        bs = self.block_size
        view = memoryview(data)
        with self._lock:
            while view:
                slot, within = divmod(pos, bs)
                n = min(len(view), bs - within)
                blk = self._blocks.get(slot)
                if blk is None:
                    blk = self._blocks[slot] = bytearray(bs)
                blk[within : within + n] = view[:n]
                view = view[n:]
                pos += n

    def read_slots(self, slot: int, nbytes: int, within: int = 0) -> bytes:
        bs = self.block_size
        slot += within // bs
        within %= bs
        parts = []
        zero = bytes(bs)
        with self._lock:
            for s in range(slot, slot + (within + nbytes + bs - 1) // bs):
                blk = self._blocks.get(s)
                parts.append(bytes(blk) if blk is not None else zero)
        return b"".join(parts)[within : within + nbytes]

    def _punch(self, start: int, count: int) -> None:
        with self._lock:
            for s in range(start, start + count):
                self._blocks.pop(s, None)


class FileStore(Store):
    """The store directory on disk."""

    def __init__(
        self, path: Path, block_size: int, strict: bool, boot_id: str, fault: Fault | None
    ) -> None:
        super().__init__(block_size, fault)
        self.path = path
        self.strict = strict
        self.boot_id = boot_id
        self.uuid = uuid.uuid4().bytes
        self._lock_fd = -1
        self.meta_fd = -1
        self.data_fd = -1
        self.log_end = 0
        self.checkpoint_end = 0  # the log proper starts here
        self._old_fds: list[int] = []
        self._reserved = 0  # the log file has space allocated up to here
        self._data_reserved = 0  # slots below this have space allocated
        self.reserve_data = True  # off where copies are clones (they bring their space)
        self._synced = 0
        self._data_written = 0  # data writes completed (strict: see _append)
        self._data_synced = 0  # ... of which known durable
        self._data_lock = threading.Lock()
        self._syncing = False
        self._sync_cond = threading.Condition()
        self.on_reopen: Callable[[], None] | None = None  # the meta file was replaced

    def lock(self) -> None:
        """Take the store directory's lock (before reading it)."""
        try:
            make_dir_durable(self.path)
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StoreError(f"cannot open store {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StoreError(f"store {self.path} is in use by another process") from err

    def start(self, header_uuid: bytes | None, checkpoint: bytes) -> None:
        """Open for writing: a fresh meta file (header + checkpoint), unclean, our boot id."""
        if header_uuid is not None:
            self.uuid = header_uuid
        self.data_fd = os.open(self.path / DATA, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._write_meta(checkpoint, clean=False)

    def _write_meta(self, checkpoint: bytes, clean: bool) -> None:
        header = Header(
            self.uuid, self.block_size, clean, self.strict, self.boot_id, len(checkpoint)
        )
        tmp = self.path / (META + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            blob = header.encode() + checkpoint
            view = memoryview(blob)
            pos = 0
            while pos < len(blob):
                pos += os.pwrite(fd, view[pos:], pos)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.rename(tmp, self.path / META)
        fsync_dir(self.path)
        if self.meta_fd >= 0:  # closed at close(): a concurrent sync may still use it
            self._old_fds.append(self.meta_fd)
        self.meta_fd = fd
        self.log_end = len(blob)
        self.checkpoint_end = len(blob)
        self._reserved = 0
        self._reserve_log()
        if self.on_reopen is not None:
            self.on_reopen()

    def _grown(self) -> None:
        if self.reserve_data and self.slots.end > self._data_reserved:
            self._reserve_data()

    def _reserve_data(self) -> None:
        """Allocate data-area space ahead of use in large steps: writes into allocated
        space skip the file system's block allocation, which stalls under load."""
        start = self._data_reserved * self.block_size
        want = max(self.slots.end * self.block_size - start, DATA_RESERVE)
        try:  # with the file size: writes inside it need no metadata update
            fallocate(self.data_fd, 0, start, want)
        except OSError:
            return  # no space: the copy itself then fails and the policy applies
        self._data_reserved = (start + want) // self.block_size

    def _write(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:  # a short write is retried: the rest fails with the real errno
            n = os.pwrite(self.data_fd, view, pos)
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view, pos = view[n:], pos + n
        self.data_written()

    def data_written(self) -> None:
        """A write into the data area completed (here, or in C: the compiled data path's
        block copy), which ``_sync_data`` makes durable before the next record."""
        with self._data_lock:
            self._data_written += 1

    def _sync_data(self) -> None:
        """fdatasync the data area unless every completed data write is durable already
        (one sync covers the writes of every thread that finished before it started)."""
        with self._data_lock:
            target = self._data_written
            if self._data_synced >= target:
                return
        os.fdatasync(self.data_fd)
        with self._data_lock:
            self._data_synced = max(self._data_synced, target)

    def read_slots(self, slot: int, nbytes: int, within: int = 0) -> bytes:
        data = os.pread(self.data_fd, nbytes, slot * self.block_size + within)
        return data if len(data) == nbytes else data.ljust(nbytes, b"\0")

    def _append(self, blob: bytes) -> None:
        if self.strict:
            # A record must not reach the disk before the slot data it points to: the
            # page cache may write the log back first, and a COPY/PRIVATE record whose
            # slot was lost would then serve garbage after power loss.
            self._sync_data()
        try:
            n = os.pwrite(self.meta_fd, blob, self.log_end)
            if n != len(blob):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            # leave no partial records behind the log end (overwriting allocated bytes
            # needs no space); the next append goes to the same place
            with contextlib.suppress(OSError):
                os.pwrite(self.meta_fd, bytes(len(blob)), self.log_end)
            raise
        self.log_end += n
        if self.log_end + LOG_RESERVE // 2 > self._reserved:
            self._reserve_log()

    def _reserve_log(self) -> None:
        """Keep space allocated beyond the log end, so that recording an invalidation
        still works when the file system is full."""
        want = self.log_end + LOG_RESERVE
        try:  # the file size grows too: appends then never change it (no journal work)
            fallocate(self.meta_fd, 0, self.log_end, LOG_RESERVE)
            self._reserved = want
        except OSError:
            pass

    def _punch(self, start: int, count: int) -> None:
        bs = self.block_size
        with contextlib.suppress(OSError):  # else the space stays; the slots are free
            write_zeroes_fd(self.data_fd, start * bs, count * bs, punch=True)

    def _shrunk(self) -> None:
        """Free runs at the end of the area shrink it: cut the file there (which drops
        the preallocated reserve too)."""
        end = self.slots.end
        if end < self._data_reserved or end * self.block_size < os.fstat(self.data_fd).st_size:
            with contextlib.suppress(OSError):
                os.ftruncate(self.data_fd, end * self.block_size)
                self._data_reserved = end

    def sync(self) -> None:
        if self.fault:
            self.fault("sync")
        self._sync_data()
        os.fdatasync(self.meta_fd)

    def sync_upto(self, seq: int) -> None:
        """Group commit: one fdatasync covers every record appended before it started."""
        with self._sync_cond:
            while self._synced < seq:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                target = self.appended
                self._sync_cond.release()
                try:
                    self.sync()
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, target)

    def wants_checkpoint(self) -> bool:
        log = self.log_end - self.checkpoint_end
        return log > max(COMPACT_AFTER, 2 * (self.checkpoint_end - HEADER_SIZE))

    def checkpoint(self, blob: bytes, clean: bool) -> None:
        """Replace the log by ``blob`` (the whole state) atomically."""
        os.fdatasync(self.data_fd)
        self._write_meta(blob, clean)
        self._synced = self.appended

    def close(self) -> None:
        for fd in (self.meta_fd, self.data_fd, self._lock_fd, *self._old_fds):
            if fd >= 0:
                os.close(fd)
        self._old_fds.clear()
        self.meta_fd = self.data_fd = self._lock_fd = -1
