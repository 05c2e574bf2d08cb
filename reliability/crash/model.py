"""What a workload promised, step by step: the model the crash states are judged by.

The workload runs in one thread, so at any crash point every step is either
acknowledged (its ``E`` note was logged), in flight (``B`` logged, ``E`` not), or not
started.  :class:`Model` replays the steps with their final statuses and keeps, per
device (origin or snapshot), the successive contents (:class:`Version`) and which of
them a crash may show: after a process kill the last acknowledged one or the one in
flight; after power loss also anything since the last *durable* one (written with FUA,
or followed by an acknowledged flush of that device, engine flush or close; a
snapshot's content at creation is durable once its create returned).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from reliability.crash.workload import Step, Workload

FLUSHES = ("flush", "eflush", "close")


@dataclass
class Version:
    step: int  # the step that produced it (-1: before the workload)
    content: bytes
    durable_when_acked: bool  # FUA write, or a snapshot's content at creation


@dataclass
class Device:
    name: str
    versions: list[Version]
    flushes: list[int] = field(default_factory=list)  # steps that flush this device


@dataclass
class Snap:
    origin: str
    name: str
    create: int  # step
    writable: bool
    device: Device
    releases: list[tuple[int, int, int]] = field(default_factory=list)  # (step, b0, b1)
    drop: int | None = None  # step

    @property
    def full(self) -> str:
        return f"{self.origin}@{self.name}"


@dataclass
class Point:
    """Where a crash point lies in the workload."""

    acked: int  # steps [0, acked) were acknowledged
    inflight: int | None  # the step in flight, if any


class Model:
    def __init__(self, wl: Workload, marks: list[tuple[int, str]]) -> None:
        self.wl = wl
        n = len(wl.steps)
        self.begin_at = [-1] * n  # crash point from which step i had begun
        self.end_at = [-1] * n  # ... and was acknowledged
        self.status = ["unrun"] * n
        self.live: list[dict[str, dict[str, object]]] = [{} for _ in range(n)]
        for k, text in marks:
            for line in text.splitlines():
                kind, rest = line.split(" ", 1)
                if kind == "B":
                    self.begin_at[int(rest)] = k
                else:
                    i, status, info = rest.split(" ", 2)
                    self.end_at[int(i)] = k
                    self.status[int(i)] = status
                    self.live[int(i)] = json.loads(info)
        self.origins = {o: Device(o, [Version(-1, wl.initial(o), True)]) for o in wl.origins}
        self.snaps: dict[str, Snap] = {}
        for no, step in enumerate(wl.steps):
            self._replay(no, step)

    # -- replay ----------------------------------------------------------------------

    def _replay(self, i: int, step: Step) -> None:
        if self.status[i] != "ok":
            return
        bs = self.wl.block_size
        if step.kind == "create":
            content = self.origins[step.dev].versions[-1].content
            dev = Device(f"{step.dev}@{step.snap}", [Version(i, content, True)])
            self.snaps[dev.name] = Snap(step.dev, step.snap, i, step.writable, dev)
        elif step.kind == "drop":
            self.snaps[f"{step.dev}@{step.snap}"].drop = i
        elif step.kind in FLUSHES:
            for d in self.devices(step.dev if step.kind == "flush" else None):
                d.flushes.append(i)
        elif step.kind in ("write", "zero") or (step.kind == "trim" and "@" not in step.dev):
            dev = self.device(step.dev)
            buf = bytearray(dev.versions[-1].content)
            data = step.data() if step.kind == "write" else bytes(step.length)
            buf[step.off : step.off + step.length] = data
            dev.versions.append(Version(i, bytes(buf), step.fua))
        elif step.kind == "trim":  # a snapshot's release: whole blocks inside the range
            snap = self.snaps[step.dev]
            size = self.wl.origins[snap.origin]
            end = step.off + step.length
            b0 = -(-step.off // bs)
            b1 = -(-size // bs) if end == size else end // bs
            if b1 > b0:
                snap.releases.append((i, b0, b1))

    def device(self, name: str) -> Device:
        return self.snaps[name].device if "@" in name else self.origins[name]

    def devices(self, name: str | None) -> list[Device]:
        if name is not None:
            return [self.device(name)]
        return [*self.origins.values(), *(s.device for s in self.snaps.values())]

    # -- crash points --------------------------------------------------------------------

    def point(self, k: int) -> Point:
        acked = 0
        inflight = None
        for i in range(len(self.wl.steps)):
            if 0 <= self.begin_at[i] <= k:
                if 0 <= self.end_at[i] <= k:
                    acked = i + 1
                else:
                    inflight = i
        return Point(acked, inflight)

    def allowed(self, dev: Device, pt: Point, power: bool) -> list[Version]:
        """The versions of ``dev`` a crash at ``pt`` may show, oldest first."""
        done = [v for v in dev.versions if v.step < pt.acked]
        first = len(done) - 1
        if power:
            flushed = max((f for f in dev.flushes if f < pt.acked), default=-1)
            first = 0
            for j, v in enumerate(done):
                if v.step < flushed or v.durable_when_acked:
                    first = j
        out = done[first:]
        out += [v for v in dev.versions if v.step == pt.inflight]
        return out

    def clean_at(self, pt: Point) -> bool | None:
        """Whether the store was closed cleanly at ``pt`` (None: a close in flight)."""
        steps = self.wl.steps
        if pt.inflight is not None and steps[pt.inflight].kind == "close":
            return None
        if pt.inflight is not None and steps[pt.inflight].kind == "open":
            # the new (unclean) checkpoint may not have replaced the old header yet
            return None if self._last_open_close(pt.acked) == "close" else False
        return self._last_open_close(pt.acked) != "open"

    def _last_open_close(self, before: int) -> str | None:
        for i in range(before - 1, -1, -1):
            if self.wl.steps[i].kind in ("open", "close") and self.status[i] == "ok":
                return self.wl.steps[i].kind
        return None

    def live_valid(self, snap: Snap, pt: Point) -> bool:
        """The live engine reported ``snap`` valid after the last acknowledged step and
        after the step in flight (when closed: the last report before)."""
        for i in (pt.acked - 1, pt.inflight):
            while i is not None and i >= 0 and "valid" not in self.live[i]:
                i -= 1
            if i is None or i < 0:
                continue
            valid = self.live[i]["valid"]
            assert isinstance(valid, dict)
            if valid.get(snap.full) is False:
                return False
        return True

    def released(self, snap: Snap, pt: Point) -> tuple[set[int], set[int]]:
        """Blocks ``snap`` must have released, and blocks it may have released."""
        must: set[int] = set()
        may: set[int] = set()
        for step, b0, b1 in snap.releases:
            if step < pt.acked:
                must.update(range(b0, b1))
            if step < pt.acked or step == pt.inflight:
                may.update(range(b0, b1))
        return must, may

    # -- checking the model against the live engine ------------------------------------

    def digest(self, content: bytes, released: set[int]) -> str:
        bs = self.wl.block_size
        h = hashlib.sha256()
        for b, off in enumerate(range(0, len(content), bs)):
            h.update(b"R" if b in released else content[off : off + bs])
        return h.hexdigest()[:16]

    def live_mismatches(self) -> list[str]:
        """Steps after which the live engine's device contents differ from the model."""
        out = []
        for i, live in enumerate(self.live):
            digests = live.get("digests", {})
            assert isinstance(digests, dict)
            pt = Point(i + 1, None)
            for name, got in digests.items():
                if "@" in name:
                    snap = self.snaps.get(name)
                    if snap is None:
                        out.append(f"after step {i} the engine has {name}, the model has not")
                        continue
                    dev, rel = snap.device, self.released(snap, pt)[0]
                else:
                    dev, rel = self.origins[name], set()
                want = self.digest(self.allowed(dev, pt, False)[-1].content, rel)
                if got != want:
                    what = self.wl.steps[i].describe()
                    out.append(f"after step {i} ({what}) {name} differs from the model")
        return out
