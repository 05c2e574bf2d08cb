"""Workloads for the crash-state explorer: scripted engine operations.

A :class:`Workload` is a list of :class:`Step` s run in order by one thread of a child
process (:mod:`reliability.crash.runner`) against ``snapimg.engine``.  Write data is
``random.Random(seed).randbytes(length)`` so that the child and the model agree on it
without shipping it.  :func:`standard` makes the explorer's set: every scenario in both
durability modes and both ``on_full`` policies.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

BOOT = "00000000-crash-explorer-recording"  # boot id of the recording session
SCENARIOS = ("snapshots", "writable", "drops", "releases", "maxsize", "reopen")


@dataclass
class Step:
    kind: str  # open close create drop write zero trim flush eflush
    dev: str = ""  # "d" (origin) or "d@s" (snapshot) for I/O; origin name for create/drop
    snap: str = ""
    off: int = 0
    length: int = 0
    seed: int = 0
    fua: bool = False
    punch: bool = False
    max_size: int | None = None
    writable: bool = False
    on_full: str = "invalidate"

    def data(self) -> bytes:
        return random.Random(self.seed).randbytes(self.length)

    def describe(self) -> str:
        if self.kind in ("write", "zero", "trim"):
            extra = " fua" if self.fua else ""
            return f"{self.kind} {self.dev} [{self.off}, +{self.length}){extra}"
        if self.kind == "create":
            opts = [f"max_size={self.max_size}"] if self.max_size is not None else []
            opts += ["writable"] if self.writable else []
            return f"create {self.dev}@{self.snap} {' '.join(opts)} on_full={self.on_full}"
        if self.kind == "drop":
            return f"drop {self.dev}@{self.snap}"
        return f"{self.kind} {self.dev}".strip()


@dataclass
class Workload:
    name: str
    durability: str
    block_size: int
    origins: dict[str, int]  # name -> size in bytes
    seed: int  # initial origin contents: random.Random(seed + index)
    steps: list[Step] = field(default_factory=list)

    def initial(self, origin: str) -> bytes:
        index = sorted(self.origins).index(origin)
        return random.Random(self.seed * 1000 + index).randbytes(self.origins[origin])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        raw = json.loads(text)
        raw["steps"] = [Step(**s) for s in raw["steps"]]
        return cls(**raw)


class _Builder:
    def __init__(self, wl: Workload, rng: random.Random, on_full: str) -> None:
        self.wl = wl
        self.rng = rng
        self.on_full = on_full
        self.snaps: dict[str, list[str]] = {o: [] for o in wl.origins}
        self.made = 0

    def add(self, step: Step) -> None:
        self.wl.steps.append(step)

    def _range(self, dev: str, aligned: bool | None = None) -> tuple[int, int]:
        size = self.wl.origins[dev.split("@")[0]]
        bs = self.wl.block_size
        if aligned if aligned is not None else self.rng.random() < 0.5:
            nblocks = -(-size // bs)
            b = self.rng.randrange(nblocks)
            n = self.rng.randint(1, 3)
            return b * bs, min(n * bs, size - b * bs)
        off = self.rng.randrange(size)
        return off, min(size - off, self.rng.randint(1, 2 * bs + bs // 2))

    def write(self, dev: str, fua: bool | None = None) -> None:
        off, n = self._range(dev)
        fua = self.rng.random() < 0.2 if fua is None else fua
        self.add(Step("write", dev, off=off, length=n, seed=self.rng.randrange(1 << 30), fua=fua))

    def writes(self, dev: str, n: int) -> None:
        for _ in range(n):
            self.write(dev)
            if self.rng.random() < 0.15:
                self.add(Step("flush", dev))

    def create(self, origin: str, **kw: object) -> str:
        self.made += 1
        name = f"s{self.made}"
        self.add(Step("create", origin, snap=name, on_full=self.on_full, **kw))  # type: ignore[arg-type]
        self.snaps[origin].append(name)
        return name

    def drop(self, origin: str, name: str) -> None:
        self.add(Step("drop", origin, snap=name))
        self.snaps[origin].remove(name)

    def release(self, dev: str) -> None:
        off, n = self._range(dev, aligned=self.rng.random() < 0.7)
        self.add(Step("trim", dev, off=off, length=n))


def _scenario(b: _Builder, kind: str) -> None:
    rng = b.rng
    d = "d"
    b.add(Step("open"))
    if kind == "snapshots":
        for _ in range(4):
            b.create(d)
            b.writes(d, rng.randint(3, 5))
        b.add(Step("eflush"))
        b.writes(d, 3)
    elif kind == "writable":
        s1 = b.create(d, writable=True)
        b.writes(d, 3)
        for _ in range(4):
            b.write(f"{d}@{s1}")
        b.add(Step("flush", f"{d}@{s1}"))
        s2 = b.create(d)
        b.writes(d, 3)
        b.write(f"{d}@{s1}", fua=True)
        b.add(Step("zero", f"{d}@{s1}", off=0, length=b.wl.block_size))
        b.writes(d, 2)
        b.drop(d, s2)
        b.writes(f"{d}@{s1}", 2)
    elif kind == "drops":
        for _ in range(3):
            s = b.create(d)
            b.writes(d, 3)
            keep = b.create(d)
            b.writes(d, 2)
            b.drop(d, s)
            b.writes(d, 2)
            if rng.random() < 0.5:
                b.drop(d, keep)
    elif kind == "releases":
        s1 = b.create(d)
        b.writes(d, 4)
        s2 = b.create(d)
        b.writes(d, 3)
        for _ in range(3):
            b.release(f"{d}@{s1}")
            b.writes(d, 2)
        b.release(f"{d}@{s2}")
        b.writes(d, 2)
    elif kind == "maxsize":
        bs = b.wl.block_size
        b.create(d, max_size=3 * bs)
        b.writes(d, 2)
        b.create(d)
        b.create(d, max_size=bs)
        b.writes(d, 8)
        b.create(d, max_size=2 * bs)
        b.writes(d, 4)
    elif kind == "reopen":
        b.create(d)
        b.create("e")
        b.writes(d, 3)
        b.writes("e", 2)
        b.add(Step("close"))
        b.add(Step("open"))
        b.add(Step("zero", d, off=b.wl.block_size, length=2 * b.wl.block_size, punch=True))
        b.add(Step("trim", d, off=4 * b.wl.block_size, length=b.wl.block_size))
        b.create(d)
        b.writes(d, 3)
        b.writes("e", 2)
        b.add(Step("close"))
        b.add(Step("open"))
        b.writes(d, 2)
    else:
        raise ValueError(f"unknown scenario {kind!r}")
    if rng.random() < 0.7:
        b.add(Step("close"))


def make(kind: str, durability: str, on_full: str, seed: int, block_size: int = 4096) -> Workload:
    rng = random.Random(seed)
    origins = {"d": 12 * block_size + 700}
    if kind == "reopen":
        origins["e"] = 6 * block_size
    wl = Workload(f"{kind}-{durability}-{on_full}", durability, block_size, origins, seed)
    _scenario(_Builder(wl, rng, on_full), kind)
    return wl


def standard(seed: int = 1) -> list[Workload]:
    """Every scenario in both durability modes and both on_full policies (24)."""
    out = []
    for i, kind in enumerate(SCENARIOS):
        for j, durability in enumerate(("strict", "default")):
            for m, on_full in enumerate(("invalidate", "block-writes")):
                out.append(make(kind, durability, on_full, seed * 100 + i * 4 + j * 2 + m))
    return out
