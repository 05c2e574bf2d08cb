"""What the soak knows: the origin and every snapshot as acknowledged requests made them,
counters, and the violations found.

The origin model is the image as every acknowledged write, zeroing and trim left it
(updated while the writer still holds the origin's gate and its byte range: see
:mod:`tests.soak.locks`).  A snapshot's model is the origin model copied while the gate
was held exclusively around its creation, then changed by the acknowledged writes to it
(writable snapshots); released blocks read as EIO, and a snapshot with a ``--max-size``
under ``--on-full invalidate`` may turn invalid (then every read is EIO).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import nbd

from snapimg.backends.base import SnapshotInfo
from snapimg.control.client import ControlClient
from tests.soak.locks import RangeLock, SharedExclusive

ORIGIN = "disk"
PIECE = 4 << 20  # the sha256-pieces rule of docs/backup.md
STATE_ZERO = 2  # NBD_STATE_ZERO of base:allocation
MAX_DETAILS = 50


SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]


def snapimg(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """One snapimg command (its exit status is the caller's to judge)."""
    return subprocess.run(
        [*SNAPIMG, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


class Actor:
    """A soak thread whose request in progress the watchdog can see; it remembers its
    slowest one."""

    current: tuple[str, float] | None = None
    slowest: tuple[float, str] = (0.0, "")

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.current = (what, t0)
        try:
            yield
        finally:
            self.current = None
            took = time.monotonic() - t0
            if took > self.slowest[0]:
                self.slowest = (took, what)


def blocks_of(off: int, n: int, bs: int) -> set[int]:
    return set(range(off // bs, (off + n - 1) // bs + 1)) if n else set()


def whole_blocks(off: int, n: int, size: int, bs: int) -> range:
    """The blocks a release of [off, +n) frees: whole blocks inside it (a range ending at
    the image's end includes its last, partial block)."""
    b0 = -(-off // bs)
    b1 = -(-size // bs) if off + n == size else (off + n) // bs
    return range(b0, max(b0, b1))


def pieces_digest(content: bytes | bytearray | memoryview) -> str:
    """The image digest ``snapimg backup`` records (sha256 of the pieces' sha256s)."""
    view = memoryview(content)
    h = hashlib.sha256()
    for pos in range(0, len(view), PIECE):
        h.update(hashlib.sha256(view[pos : pos + PIECE]).digest())
    return h.hexdigest()


def connect(socket: Path, export: str, structured: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    else:
        h.set_request_structured_replies(False)
    h.connect_unix(str(socket))
    return h


def disconnect(h: nbd.NBD) -> None:
    with contextlib.suppress(nbd.Error):  # the server may have cut it already (a drop)
        h.shutdown()


def extents(h: nbd.NBD, off: int, n: int) -> list[int]:
    seen: list[int] = []

    def extent(meta: str, o: int, entries: list[int], err: object) -> int:
        seen.extend(entries)
        return 0

    h.block_status(n, off, extent)
    return seen


def untruthful_zero(
    entries: list[int], off: int, n: int, content: bytes | bytearray, blocked: set[int], bs: int
) -> str | None:
    """Why a block status answer for [off, +n) is wrong, or None: extents must follow
    each other from ``off`` and not pass the end, and what they call zero must read as
    zero in ``content`` (blocks in ``blocked``, released ones, read EIO and are skipped)."""
    if not entries:
        return "no extents"
    pos = off
    for length, flags in zip(entries[::2], entries[1::2], strict=True):
        if length <= 0 or pos + length > off + n:
            return f"extent {length} at {pos} outside [{off}, +{n})"
        if flags & STATE_ZERO:
            for b in blocks_of(pos, length, bs) - blocked:
                lo, hi = max(pos, b * bs), min(pos + length, (b + 1) * bs)
                if any(content[lo:hi]):
                    return f"[{lo}, {hi}) reported zero but holds data"
        pos += length
    return None


@dataclass
class SnapModel:
    snap: str
    data: bytes | bytearray  # bytes for read-only snapshots: never changes
    writable: bool
    max_size: int | None
    on_full: str
    released: set[int] = field(default_factory=set)
    invalid_since: float | None = None  # monotonic time the soak saw it invalid
    dropped: bool = False
    kept_point: str | None = None  # the backup point it was kept for (a --since base)
    pinned: int = 0  # backups running --since it: not dropped meanwhile
    guard: SharedExclusive = field(default_factory=SharedExclusive)
    ranges: RangeLock = field(default_factory=RangeLock)
    handles: list[nbd.NBD] = field(default_factory=list)  # closed by a drop

    @property
    def export(self) -> str:
        return f"{ORIGIN}@{self.snap}"

    @property
    def may_invalidate(self) -> bool:
        return self.max_size is not None and self.on_full == "invalidate"

    @property
    def blocks_writes(self) -> bool:
        return self.max_size is not None and self.on_full == "block-writes"


class Stats:
    """Thread-safe counters: operations by kind, bytes, lifecycle and backup events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.expected_errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.bytes_written = 0
        self.bytes_read = 0

    def op(self, kind: str, written: int = 0, read: int = 0) -> None:
        with self._lock:
            self.ops[kind] += 1
            self.bytes_written += written
            self.bytes_read += read

    def expected(self, what: str) -> None:
        with self._lock:
            self.expected_errors[what] += 1

    def event(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.events[what] += n


class Violations:
    """Everything that contradicts a model or a promise; printed as found."""

    def __init__(self, log: Path) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.details: list[str] = []
        self.log = log

    def add(self, kind: str, detail: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {kind}: {detail}"
        with self._lock:
            self.count += 1
            if len(self.details) < MAX_DETAILS:
                self.details.append(line[:2000])
            with self.log.open("a") as f:
                f.write(line + "\n")
        print(f"soak: VIOLATION {line[:500]}", file=sys.stderr, flush=True)


class World:
    """The served origin, its snapshots, and their models, shared by every soak thread."""

    def __init__(
        self, image: bytes, block_size: int, socket: Path, control: Path, work: Path
    ) -> None:
        self.size = len(image)
        self.bs = block_size
        self.origin = bytearray(image)
        self.gate = SharedExclusive()
        self.origin_ranges = RangeLock()
        self.snaps: dict[str, SnapModel] = {}
        self.snaps_lock = threading.Lock()
        self.socket = socket
        self.control_path = control
        self.work = work
        self.stats = Stats()
        self.violations = Violations(work / "violations.log")
        self.stop = threading.Event()
        self.abort = threading.Event()  # a hang or a dead server: stop checking, report
        self.counter = 0  # snapshot names
        self.pending: set[str] = set()  # snapshots a running backup may create
        self.trace_file: TextIO | None = None  # --trace: every origin write and gate hold
        self.trace_lock = threading.Lock()

    def trace(self, line: str) -> None:
        if self.trace_file is not None:
            with self.trace_lock:
                self.trace_file.write(f"{time.monotonic():.6f} {line}\n")

    def control(self) -> ControlClient:
        return ControlClient(self.control_path, timeout=600)

    def next_name(self, prefix: str) -> str:
        with self.snaps_lock:
            self.counter += 1
            return f"{prefix}{self.counter}"

    def live(self) -> list[SnapModel]:
        with self.snaps_lock:
            return [s for s in self.snaps.values() if not s.dropped]

    def add_snap(self, snap: SnapModel) -> None:
        with self.snaps_lock:
            self.snaps[snap.snap] = snap

    def forget_snap(self, snap: SnapModel) -> None:
        with self.snaps_lock:
            self.snaps.pop(snap.snap, None)

    def writes_may_be_refused(self) -> bool:
        """A live snapshot with a max size under block-writes: origin writes may get
        ENOSPC.  Read under the gate (shared): none can be created meanwhile."""
        return any(s.blocks_writes for s in self.live())

    def confirm_invalid(self, snap: SnapModel, context: str) -> bool:
        """An EIO from ``snap`` outside released blocks: true if the server lists it
        invalid for a reason its model allows (its max size under on-full invalidate);
        a violation otherwise."""
        if snap.invalid_since is not None:
            return True
        info = self.listed(snap)
        if info is None:
            self.violations.add("eio", f"{context}: EIO and {snap.export} is not listed")
            return False
        if info.valid:
            self.violations.add("eio", f"{context}: EIO but {snap.export} is valid")
            return False
        return self.accept_invalid(snap, info.reason or "", context)

    def listed(self, snap: SnapModel) -> SnapshotInfo | None:
        return {i.snap: i for i in self.control().list_snapshots()}.get(snap.snap)

    def invalid_now(self, snap: SnapModel, context: str) -> bool:
        """Whether the server lists ``snap`` invalid (for a reason its model allows)."""
        if snap.invalid_since is not None:
            return True
        info = self.listed(snap)
        return (
            info is not None
            and not info.valid
            and self.accept_invalid(snap, info.reason or "", context)
        )

    def check_output(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        """A snapimg command that succeeded printed no traceback either."""
        if "Traceback" in proc.stdout + proc.stderr:
            self.violations.add("traceback", f"{what}: {proc.stderr[-3000:]}")

    def accept_invalid(self, snap: SnapModel, reason: str, context: str) -> bool:
        """The server lists ``snap`` invalid: right only for a snapshot with a max size
        under on-full invalidate, for that reason."""
        if not snap.may_invalidate or "max size" not in reason:
            self.violations.add(
                "invalid", f"{context}: {snap.export} (max_size={snap.max_size}, "
                f"on_full={snap.on_full}) turned invalid: {reason}"
            )  # fmt: skip
            return False
        with self.snaps_lock:
            if snap.invalid_since is None:
                snap.invalid_since = time.monotonic()
                self.stats.event("snapshots_invalidated")
        return True

    def figures(self) -> dict[str, Any]:
        s = self.stats
        ev = s.events
        return {
            "ops": dict(sorted(s.ops.items())),
            "expected_errors": dict(sorted(s.expected_errors.items())),
            "bytes_written": s.bytes_written,
            "bytes_read": s.bytes_read,
            "snapshots": {
                "created": ev["snapshots_created"],
                "created_writable": ev["snapshots_created_writable"],
                "created_max_size": ev["snapshots_created_max_size"],
                "dropped": ev["snapshots_dropped"],
                "released": ev["releases"],  # release commands that freed blocks
                "invalidated": ev["snapshots_invalidated"],
            },
            "backups": {
                "made": ev["backups_made"],
                "full": ev["backups_full"],
                "incremental": ev["backups_incremental"],
                "kept": ev["backups_kept"],
                "prunes": ev["prunes"],
                "restored": ev["backups_restored"],
            },
        }
