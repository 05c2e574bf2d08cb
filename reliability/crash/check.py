"""Reopening one crash state and judging it against the model.

Each finding names the rule it breaks (docs/crash-states.md lists them):

* ``open``: the store must open, or after power loss be refused with a one-line
  StoreError when nothing had to survive; ``refused`` otherwise; anything but a
  StoreError raised is ``open`` too;
* a store is *trusted* after a process kill, in strict mode, and when it had been
  closed cleanly: then every acknowledged, not dropped snapshot is listed (``missing``),
  valid if the live engine had it valid (``invalidated``), reads exactly its model
  content (``content``; ``content-unflushed-origin`` when the bytes are the origin's
  from before the snapshot, lost because they were never flushed), released blocks
  read as released (``released``); an acknowledged drop stays dropped (``undropped``);
* untrusted (default mode after power loss): every snapshot listed invalid with a
  reason (``default-valid``), none silently gone (``vanished``);
* invalid snapshots have a reason and refuse reads (``invalid``); nothing is listed
  that was never created (``unknown``);
* every origin sector holds a content the model allows (``origin``);
* ``changed_ranges`` covers every block where a valid snapshot differs from the origin
  (``changed-ranges``); close works and a second open lists the same (``reopen``).
"""

from __future__ import annotations

import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from reliability.crash.images import SECTOR
from reliability.crash.model import Model, Point, Snap, Version
from reliability.crash.workload import BOOT
from snapimg.engine import Engine
from snapimg.errors import ReleasedRangeError, SnapshotInvalidError, StoreError

# Rules broken by the engine as of this writing (see the report in docs/crash-states.md);
# the pytest subset and the bench keep them apart from everything else.
KNOWN_ENGINE_FINDINGS = frozenset({"vanished", "content-unflushed-origin"})


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str


def _bad_sector(actual: bytes, contents: list[bytes]) -> int | None:
    """Offset of the first sector of ``actual`` no content allows (None: all fine)."""
    if actual in contents:
        return None
    if not contents or len(actual) != len(contents[0]):
        return 0
    for pos in range(0, len(actual), SECTOR):
        got = actual[pos : pos + SECTOR]
        if all(got != c[pos : pos + SECTOR] for c in contents):
            return pos
    return None


def _blank_blocks(content: bytes, blocks: set[int], bs: int) -> bytes:
    buf = bytearray(content)
    for b in blocks:
        lo, hi = b * bs, min(len(buf), (b + 1) * bs)
        buf[lo:hi] = bytes(max(0, hi - lo))
    return bytes(buf)


class Checker:
    def __init__(self, model: Model, origin_paths: dict[str, Path]) -> None:
        self.model = model
        self.wl = model.wl
        self.origin_paths = origin_paths

    def _open(self, store: Path, boot: str) -> Engine:
        wl = self.wl
        return Engine.open(store, self.origin_paths, wl.block_size, wl.durability,  # type: ignore[arg-type]
                           boot_id=boot)  # fmt: skip

    def check(self, store: Path, k: int, power: bool) -> list[Finding]:
        """Findings in the state materialized with its store in ``store``."""
        model = self.model
        pt = model.point(k)
        clean = model.clean_at(pt)
        trusted = not power or self.wl.durability == "strict" or clean is True
        boot = str(uuid.uuid4()) if power else BOOT
        must_exist = [
            s for s in model.snaps.values() if s.create < pt.acked and not _dropping(s, pt)
        ]
        try:
            eng = self._open(store, boot)
        except StoreError as err:
            msg = str(err)
            out = []
            if "\n" in msg:
                out.append(Finding("refused", f"refusal is not one line: {msg!r}"))
            if not power or must_exist:
                names = ", ".join(s.full for s in must_exist) or "nothing"
                msg = f"store refused ({msg}) though {names} had to survive"
                out.append(Finding("refused", msg))
            return out
        except Exception:
            return [Finding("open", f"open raised {traceback.format_exc(limit=-3)}")]
        try:
            out = self._check_open(eng, pt, power, trusted, clean, must_exist)
        except Exception:
            out = [Finding("open", f"checking raised {traceback.format_exc(limit=-3)}")]
        try:
            listing = sorted((i.origin, i.snap, i.valid) for i in eng.snapshots())
            eng.close()
            with self._open(store, boot) as again:
                second = sorted((i.origin, i.snap, i.valid) for i in again.snapshots())
            if second != listing:
                out.append(Finding("reopen", f"after close and reopen: {second}, were {listing}"))
        except Exception:
            out.append(Finding("reopen", f"close/reopen raised {traceback.format_exc(limit=-3)}"))
        return out

    def _check_open(
        self, eng: Engine, pt: Point, power: bool, trusted: bool, clean: bool | None,
        must_exist: list[Snap],
    ) -> list[Finding]:  # fmt: skip
        model = self.model
        out: list[Finding] = []
        listed = {f"{i.origin}@{i.snap}": i for i in eng.snapshots()}
        origin_now = {o: eng.origin_device(o).pread(0, size) for o, size in self.wl.origins.items()}
        for o, dev in model.origins.items():
            allowed = model.allowed(dev, pt, power)
            pos = _bad_sector(origin_now[o], [v.content for v in allowed])
            if pos is not None:
                steps = [v.step for v in allowed]
                out.append(Finding("origin", f"origin {o} bytes [{pos}, +{SECTOR}) match none "
                                             f"of the contents of steps {steps}"))  # fmt: skip
        for s in must_exist:
            if s.full not in listed:
                rule = "missing" if trusted else "vanished"
                out.append(Finding(rule, f"snapshot {s.full} (created at step {s.create}) is gone"))
        for name, info in listed.items():
            snap = model.snaps.get(name)
            if snap is None or not (snap.create < pt.acked or snap.create == pt.inflight):
                out.append(Finding("unknown", f"snapshot {name} is listed but was never created"))
            elif trusted and snap.drop is not None and snap.drop < pt.acked:
                msg = f"snapshot {name} dropped at step {snap.drop} is listed"
                out.append(Finding("undropped", msg))
            elif not info.valid:
                out.extend(self._check_invalid(eng, snap, info.reason, pt, trusted))
            elif not trusted and clean is not None:
                out.append(Finding("default-valid", f"snapshot {name} is valid after power loss"))
            else:
                out.extend(self._check_valid(eng, snap, pt, power, origin_now[snap.origin]))
        return out

    def _check_invalid(
        self, eng: Engine, snap: Snap, reason: str | None, pt: Point, trusted: bool
    ) -> list[Finding]:
        out = []
        if not reason:
            out.append(Finding("invalid", f"snapshot {snap.full} is invalid without a reason"))
        if (trusted and snap.create < pt.acked and not _dropping(snap, pt)
                and self.model.live_valid(snap, pt)):  # fmt: skip
            out.append(Finding("invalidated", f"snapshot {snap.full} became invalid: {reason}"))
        try:
            eng.snapshot_device(snap.origin, snap.name).pread(0, 1)
            out.append(Finding("invalid", f"invalid snapshot {snap.full} can be read"))
        except SnapshotInvalidError:
            pass
        return out

    def _check_valid(
        self, eng: Engine, snap: Snap, pt: Point, power: bool, origin: bytes
    ) -> list[Finding]:
        bs = self.wl.block_size
        dev = eng.snapshot_device(snap.origin, snap.name)
        must, may = self.model.released(snap, pt)
        out = []
        actual = bytearray()
        released: set[int] = set()
        for b, off in enumerate(range(0, dev.size, bs)):
            n = min(bs, dev.size - off)
            try:
                actual += dev.pread(off, n)
            except ReleasedRangeError:
                released.add(b)
                actual += bytes(n)
                if b not in may:
                    out.append(Finding("released", f"{snap.full} block {b} reads as released"))
                continue
            if b in must:
                out.append(Finding("released", f"{snap.full} block {b} was released, reads data"))
        blank = released | must
        got = _blank_blocks(bytes(actual), blank, bs)
        allowed = self.model.allowed(snap.device, pt, power)
        pos = _bad_sector(got, [_blank_blocks(v.content, blank, bs) for v in allowed])
        if pos is not None:
            out.append(self._content_finding(snap, got, pos, allowed))
        covered = {off // bs + i for off, n in eng.changed_ranges(snap.origin, snap.name)
                   for i in range(-(-n // bs))}  # fmt: skip
        for b, off in enumerate(range(0, dev.size, bs)):
            differs = got[off : off + bs] != origin[off : off + bs]
            if differs and b not in blank and b not in covered:
                out.append(Finding("changed-ranges", f"{snap.full} block {b} differs from the "
                                                     f"origin, not in changed_ranges"))  # fmt: skip
                break
        return out

    def _content_finding(self, snap: Snap, got: bytes, pos: int, allowed: list[Version]) -> Finding:
        sector = got[pos : pos + SECTOR]
        older = [v.step for v in self.model.origins[snap.origin].versions
                 if v.step < snap.create and v.content[pos : pos + SECTOR] == sector]  # fmt: skip
        where = f"{snap.full} bytes [{pos}, +{SECTOR})"
        if older:
            return Finding("content-unflushed-origin", f"{where} hold the origin's content of "
                           f"step {older[-1]}, before the snapshot (step {snap.create}): an origin "
                           f"write not flushed at creation was lost")  # fmt: skip
        steps = [v.step for v in allowed]
        return Finding("content", f"{where} match none of the contents of steps {steps}")


def _dropping(s: Snap, pt: Point) -> bool:
    return s.drop is not None and (s.drop < pt.acked or s.drop == pt.inflight)
