"""Crash states at one crash point, and writing a state out as real files.

A *kill* state (process crash: the page cache survives) has every completed event; a
*kill-torn* one also the first pages of the write in progress.  *Power* states (power
loss) have the durable contents plus a choice of pending events: none, all, random
subsets with random sector tearing, and all-but-one for some events.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reliability.crash.images import PAGE, SECTOR, Image
from reliability.crash.timeline import CrashPoint, Data, FileEvent


@dataclass
class CrashState:
    kind: str  # "kill", "kill-torn", "power"
    k: int
    images: dict[int, Image]
    dirs: dict[int, dict[str, int]]
    how: str  # what was chosen, for reports

    @property
    def power(self) -> bool:
        return self.kind == "power"

    def digest(self, root: int) -> bytes:
        h = hashlib.blake2b(self.kind.startswith("kill").to_bytes(1, "little"), digest_size=16)
        stack = [("", root)]
        while stack:
            path, fid = stack.pop()
            if fid in self.dirs:
                for name in sorted(self.dirs[fid]):
                    stack.append((f"{path}/{name}", self.dirs[fid][name]))
                h.update(f"D{path}\0".encode())
            else:
                h.update(f"F{path}\0".encode())
                h.update(self.images[fid].digest())
        return h.digest()


Choice = tuple[FileEvent, frozenset[int] | None]  # an event and its torn sectors (None: whole)


def _apply(
    cp: CrashPoint, chosen: dict[int, list[Choice]], prefixes: dict[int, int]
) -> tuple[dict[int, Image], dict[int, dict[str, int]]]:
    images = dict(cp.images)
    for fid, evs in chosen.items():
        if not evs:
            continue
        img = images[fid].copy()
        for ev, sectors in evs:
            if isinstance(ev, Data):
                ev.apply(img, sectors)
            else:
                ev.apply(img)
        images[fid] = img
    dirs = dict(cp.dirs)
    for fid, n in prefixes.items():
        if n:
            entries = dict(dirs[fid])
            for nev in cp.pending_names[fid][:n]:
                nev.apply(entries)
            dirs[fid] = entries
    return images, dirs


def _forced(ev: FileEvent) -> bool:
    return isinstance(ev, Data) and ev.dsync


def kill_states(cp: CrashPoint, next_event: object, rng: random.Random) -> Iterator[CrashState]:
    everything: dict[int, list[Choice]] = {
        f: [(ev, None) for ev in evs] for f, evs in cp.pending.items()
    }
    all_names = {f: len(n) for f, n in cp.pending_names.items()}
    images, dirs = _apply(cp, everything, all_names)
    yield CrashState("kill", cp.k, images, dirs, "all completed calls")
    if isinstance(next_event, Data) and len(next_event.blob) > PAGE:
        # killed inside a large write: a page-aligned prefix of it landed
        first_page = next_event.start // PAGE
        last_page = (next_event.start + len(next_event.blob) - 1) // PAGE
        cut = rng.randrange(first_page + 1, last_page + 1) * PAGE
        n = (cut - next_event.start) // SECTOR
        torn = dict(everything)
        torn.setdefault(next_event.fid, [])
        torn[next_event.fid] = [*torn[next_event.fid], (next_event, frozenset(range(n)))]
        images, dirs = _apply(cp, torn, all_names)
        yield CrashState("kill-torn", cp.k, images, dirs, f"next write torn at byte {cut}")


def power_states(
    cp: CrashPoint, rng: random.Random, samples: int, omissions: int
) -> Iterator[CrashState]:
    pending = [(f, i, ev) for f, evs in cp.pending.items() for i, ev in enumerate(evs)]

    def pick(keep: set[tuple[int, int]], tear: float) -> dict[int, list[Choice]]:
        out: dict[int, list[Choice]] = {}
        for f, i, ev in pending:
            if (f, i) not in keep and not _forced(ev):
                continue
            sectors = None
            if isinstance(ev, Data) and not ev.dsync and ev.sectors > 1 and rng.random() < tear:
                sectors = frozenset(s for s in range(ev.sectors) if rng.random() < 0.5)
            out.setdefault(f, []).append((ev, sectors))
        return out

    none = {f: 0 for f in cp.pending_names}
    every = {f: len(n) for f, n in cp.pending_names.items()}
    keys = {(f, i) for f, i, _ in pending}
    images, dirs = _apply(cp, pick(set(), 0.0), none)
    yield CrashState("power", cp.k, images, dirs, "durable only")
    images, dirs = _apply(cp, pick(keys, 0.0), every)
    yield CrashState("power", cp.k, images, dirs, "every pending call")
    if not pending and not any(cp.pending_names.values()):
        return
    for _ in range(samples):
        p = rng.choice((0.25, 0.5, 0.75))
        keep = {key for key in keys if rng.random() < p}
        prefixes = {f: rng.randrange(len(n) + 1) for f, n in cp.pending_names.items()}
        images, dirs = _apply(cp, pick(keep, 0.3), prefixes)
        how = f"{len(keep)} of {len(keys)} pending calls, names {prefixes}"
        yield CrashState("power", cp.k, images, dirs, how)
    for f, i, ev in rng.sample(pending, min(omissions, len(pending))):
        images, dirs = _apply(cp, pick(keys - {(f, i)}, 0.0), every)
        how = f"all pending but {type(ev).__name__} #{i} of file {f}"
        yield CrashState("power", cp.k, images, dirs, how)


def materialize(state: CrashState, root: int, into: Path, origins: dict[int, Path]) -> None:
    """Write ``state`` below ``into`` (a fresh directory standing for the recorded root);
    origin files (by fid) are rewritten in place at their own paths instead, so that they
    keep their inode number and extended attributes (the store's fingerprint of them)."""
    stack = [(into, root)]
    while stack:
        path, fid = stack.pop()
        for name, child in state.dirs[fid].items():
            target = path / name
            if child in origins:
                fd = os.open(origins[child], os.O_RDWR)
                try:
                    state.images[child].store(fd)
                finally:
                    os.close(fd)
            elif child in state.dirs:
                target.mkdir()
                stack.append((target, child))
            else:
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    state.images[child].store(fd)
                finally:
                    os.close(fd)
