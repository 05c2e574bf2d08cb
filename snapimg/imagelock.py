"""Image locks that QEMU honours: the byte-range locks of QEMU's file driver.

QEMU's ``file`` driver (block/file-posix.c, ``raw_apply_lock_bytes`` and
``raw_check_lock_bytes``) marks what it does with an image by open-file-description
locks (``F_OFD_SETLK``) on single bytes of the image file itself, all of them shared
(``F_RDLCK``) locks:

- byte ``100 + bit`` for each block permission it *holds* (``BLK_PERM_*`` of
  include/block/block-common.h: bit 0 consistent read, 1 write, 2 write unchanged,
  3 resize; QEMU 6.1 and older also bit 4, "change children");
- byte ``200 + bit`` for each permission it does *not share* with other users.

Before it commits, it tests with ``F_OFD_GETLK`` (a write lock, so any other holder
shows) that nobody holds byte ``200 + bit`` for a permission it wants ("Failed to get
"write" lock") nor byte ``100 + bit`` for a permission it refuses to share ("Failed to
get shared "write" lock").  A VM's writable disk holds consistent read + write and does
not share write; ``qemu-img info -U`` (force share) tests nothing.

:class:`ImageLock` takes the same locks, so while ``snapimg serve`` holds an image,
qemu-io, qemu-img and qemu-system-x86_64 opening it for writing fail with QEMU's own
error, and snapimg refuses an image a VM (or another snapimg) holds.  :func:`probe`
tells who holds what without taking anything.  Locks are advisory: they stop QEMU and
snapimg, not ``dd``.  Linux only (OFD locks, 64-bit ``struct flock``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapimg.errors import ImageInUseError, UsageError

PERM_BASE = 100  # RAW_LOCK_PERM_BASE: byte 100 + bit = "holds this permission"
SHARED_BASE = 200  # RAW_LOCK_SHARED_BASE: byte 200 + bit = "does not share it"


class Perm(enum.IntFlag):
    """QEMU's block permissions (``BLK_PERM_*``); the bit number is the lock byte offset."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08
    GRAPH_MOD = 0x10  # removed in QEMU 6.2; older QEMUs may still lock its bytes


# BLK_PERM_ALL of QEMU 7.2: the permissions a lock is taken and checked for.
ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
# What probe() looks at: also the bytes of QEMU <= 6.1's "change children".
_PROBED = ALL | Perm.GRAPH_MOD

# bdrv_perm_names(): the words QEMU's error messages use.
PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
    Perm.GRAPH_MOD: "change children",
}

# What ``snapimg serve`` holds on an origin: what a VM holds on its writable disk (read,
# write, not shared) and, because the engine's view of the origin has a fixed size,
# resize not shared either.
SERVE_PERM = Perm.CONSISTENT_READ | Perm.WRITE
SERVE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED

_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid


def _bits(perms: Perm) -> Iterator[Perm]:
    for perm in Perm:
        if perms & perm:
            yield perm


def perm_names(perms: Perm) -> str:
    """``Perm.WRITE | Perm.RESIZE`` -> ``"write, resize"`` (as bdrv_perm_names)."""
    return ", ".join(PERM_NAMES[p] for p in _bits(perms))


def _setlk(fd: int, kind: int, offset: int) -> bool:
    """Take (F_RDLCK) or drop (F_UNLCK) an OFD lock on one byte; False if it conflicts."""
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked_by_other(fd: int, offset: int) -> bool:
    """Whether another open file description holds any lock on byte ``offset``."""
    arg = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    kind = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))[0]
    return bool(kind != fcntl.F_UNLCK)


def _open(path: Path) -> int:
    try:
        # O_NONBLOCK: a FIFO or a tape must not hang the open (locks do not care)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        raise UsageError(f"cannot open image {path}: {err.strerror}") from None


@dataclass(frozen=True)
class Holder:
    """A process holding lock bytes of an image (as far as /proc lets us see)."""

    pid: int
    command: str  # "qemu-system-x86_64", "snapimg", ...

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid})"


@dataclass(frozen=True)
class LockState:
    """Who holds what on an image, as QEMU's lock bytes say."""

    path: Path
    held: Perm  # permissions some process holds (bytes 100 + bit)
    unshared: Perm  # permissions some process does not share (bytes 200 + bit)
    holders: tuple[Holder, ...]  # processes with lock bytes on it (empty if not visible)

    @property
    def in_use(self) -> bool:
        """True if any QEMU or snapimg process has the image open with locks."""
        return bool(self.held or self.unshared)

    @property
    def writer(self) -> bool:
        """True if someone holds the write permission (a running VM, snapimg serve)."""
        return bool(self.held & Perm.WRITE)

    def describe(self) -> str:
        """One line: ``"held: consistent read, write; not shared: write; by qemu-... (pid N)"``."""
        if not self.in_use:
            return "not in use"
        parts = []
        if self.held:
            parts.append(f"held: {perm_names(self.held)}")
        if self.unshared:
            parts.append(f"not shared: {perm_names(self.unshared)}")
        return "; ".join(parts) + f"; {_by(self.holders)}"


def _by(holders: tuple[Holder, ...]) -> str:
    if not holders:
        return "by a process this user cannot see"
    return "by " + ", ".join(map(str, holders))


def probe(path: Path) -> LockState:
    """Who holds QEMU lock bytes on ``path``; takes no lock.

    Raises :class:`UsageError` if the image cannot be opened.
    """
    fd = _open(path)
    try:
        held = Perm(0)
        unshared = Perm(0)
        for perm in _bits(_PROBED):
            bit = perm.bit_length() - 1
            if _locked_by_other(fd, PERM_BASE + bit):
                held |= perm
            if _locked_by_other(fd, SHARED_BASE + bit):
                unshared |= perm
        holders = holders_of(fd) if held or unshared else ()
    finally:
        os.close(fd)
    return LockState(path, held, unshared, holders)


def check_not_in_use(path: Path) -> None:
    """Raise :class:`ImageInUseError` if a QEMU or snapimg process has ``path`` open with
    locks (a running VM, ``snapimg serve``, qemu-img): a tool about to replace or rewrite
    the file (``restore --to``) must not.  To also keep others out while writing, take
    :meth:`ImageLock.acquire` instead and hold it."""
    state = probe(path)
    if not state.in_use:
        return
    used = state.held or state.unshared
    first = next(_bits(used))
    raise ImageInUseError(
        f"image {path} is in use {_by(state.holders)} ({state.describe().split('; by ')[0]})",
        path=path,
        permission=PERM_NAMES[first],
        holders=state.holders,
    )


class ImageLock:
    """QEMU's locks on one image, held until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path, fd: int, perm: Perm, shared: Perm) -> None:
        self.path = path
        self.perm = perm
        self.shared = shared
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path, perm: Perm = SERVE_PERM, shared: Perm = SERVE_SHARED) -> ImageLock:
        """Lock ``path`` as QEMU would to use it with ``perm``, sharing only ``shared``.

        Raises :class:`ImageInUseError` (QEMU's words: ``Failed to get "write" lock``)
        when another QEMU or snapimg process holds a conflicting lock, and
        :class:`UsageError` when the image cannot be opened.
        """
        fd = _open(path)
        try:
            failure = _apply(fd, perm, ALL & ~shared) or _check(fd, perm, shared)
            if failure is None:
                return cls(path, fd, perm, shared)
            perm_failed, message = failure
            # Drop what we took before looking: the holders are then only the others.
            with contextlib.suppress(OSError):
                _unlock_all(fd)
            holders = holders_of(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        raise ImageInUseError(
            f"image {path} is in use {_by(holders)}: {message}",
            path=path,
            permission=PERM_NAMES[perm_failed],
            holders=holders,
        )

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Drop every lock byte (closing the open file description does that)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _apply(fd: int, perm: Perm, unshared: Perm) -> tuple[Perm, str] | None:
    for base, perms in ((PERM_BASE, perm), (SHARED_BASE, unshared)):
        for p in _bits(perms):
            offset = base + p.bit_length() - 1
            if not _setlk(fd, fcntl.F_RDLCK, offset):
                return p, f"Failed to lock byte {offset}"
    return None


def _check(fd: int, perm: Perm, shared: Perm) -> tuple[Perm, str] | None:
    for p in _bits(perm & ALL):
        if _locked_by_other(fd, SHARED_BASE + p.bit_length() - 1):
            return p, f'Failed to get "{PERM_NAMES[p]}" lock'
    for p in _bits(ALL & ~shared):
        if _locked_by_other(fd, PERM_BASE + p.bit_length() - 1):
            return p, f'Failed to get shared "{PERM_NAMES[p]}" lock'
    return None


def _unlock_all(fd: int) -> None:
    for base in (PERM_BASE, SHARED_BASE):
        for p in _bits(ALL):
            _setlk(fd, fcntl.F_UNLCK, base + p.bit_length() - 1)


def holders_of(fd: int) -> tuple[Holder, ...]:
    """Processes (other than this open file description) with QEMU lock bytes on the file.

    Read from ``/proc/PID/fdinfo/FD`` ``lock:`` lines (OFD locks report no pid through
    ``F_OFD_GETLK``); processes of other users are invisible to non-root callers.
    """
    st = os.fstat(fd)
    dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    me = os.getpid()
    found: dict[int, Holder] = {}
    with contextlib.suppress(OSError):
        for proc in os.scandir("/proc"):
            if not proc.name.isdigit() or int(proc.name) in found:
                continue
            pid = int(proc.name)
            if _holds_lock_bytes(pid, dev_ino, skip_fd=fd if pid == me else None):
                found[pid] = Holder(pid, _command(pid))
    return tuple(found[pid] for pid in sorted(found))


def _holds_lock_bytes(pid: int, dev_ino: str, skip_fd: int | None) -> bool:
    try:
        entries = list(os.scandir(f"/proc/{pid}/fdinfo"))
    except OSError:
        return False
    for entry in entries:
        if skip_fd is not None and entry.name == str(skip_fd):
            continue
        try:
            with open(entry.path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("lock:") and _lock_line_matches(line, dev_ino):
                return True
    return False


def _lock_line_matches(line: str, dev_ino: str) -> bool:
    # "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146641 100 101"
    fields = line.split()
    if len(fields) < 4 or fields[-3] != dev_ino:
        return False
    try:
        start = int(fields[-2])
        end = (1 << 63) if fields[-1] == "EOF" else int(fields[-1])
    except ValueError:
        return False
    first, last = PERM_BASE, SHARED_BASE + len(PERM_NAMES) - 1
    return start <= last and end >= first


def _command(pid: int) -> str:
    """A short name for a process: ``qemu-system-x86_64``, ``snapimg``, ``qemu-img``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if not argv:
        return "?"
    names = [os.path.basename(a) for a in argv[:3]]
    if "snapimg" in names or any(a.startswith("snapimg") for a in argv[1:3]):
        return "snapimg"
    return names[0]
