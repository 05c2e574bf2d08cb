"""The snapshot lifecycle at random intervals, half through the CLI (`snapimg snapshot
...`), half through the control socket: create (read-only or --writable, some with
--max-size under either --on-full policy), read whole or in parts, release ranges,
drop; after each action the server's snapshot list is held against the models."""

from __future__ import annotations

import json
import random
import threading
import time
import traceback
from typing import Any

from snapimg.errors import SnapimgError
from tests.soak.model import (
    ORIGIN,
    Actor,
    SnapModel,
    World,
    connect,
    disconnect,
    snapimg,
    whole_blocks,
)
from tests.soak.verify import check_snapshot

MiB = 1 << 20


class Lifecycle(threading.Thread, Actor):
    def __init__(self, world: World, seed: int, interval: float, max_live: int) -> None:
        super().__init__(name="soak-lifecycle", daemon=True)
        self.w = world
        self.rnd = random.Random(seed)
        self.interval = interval
        self.max_live = max_live

    def run(self) -> None:
        while not self.w.stop.wait(self.rnd.expovariate(1 / self.interval)):
            if self.w.abort.is_set():
                return
            try:
                self.act()
                self.check_list()
            except Exception:
                if not self.w.abort.is_set():
                    self.w.violations.add("lifecycle", traceback.format_exc())

    def act(self) -> None:
        live = self.w.live()
        # origin writes get ENOSPC while a limited block-writes snapshot lives, and an
        # invalid snapshot is of no more use: a short life for both
        doomed = [s for s in live if s.blocks_writes or s.invalid_since is not None]
        r = self.rnd.random()
        if not live or (r < 0.3 and len(live) < self.max_live):
            self.create()
        elif doomed and r < 0.6:
            self.drop(self.rnd.choice(doomed))
        elif r < 0.55:
            self.read(self.rnd.choice(live), whole=self.rnd.random() < 0.4)
        elif r < 0.75:
            self.release(self.rnd.choice(live))
        else:
            unpinned = [s for s in live if not s.pinned]
            if unpinned:
                self.drop(self.rnd.choice(unpinned))

    def cli(self) -> bool:
        return self.rnd.random() < 0.5

    def create(self) -> None:
        w, rnd = self.w, self.rnd
        name = w.next_name("s")
        writable = rnd.random() < 0.3
        max_size = rnd.choice([1, 16, 128, 512]) * w.bs if rnd.random() < 0.35 else None
        on_full = rnd.choice(["invalidate", "block-writes"])
        args = [f"{ORIGIN}@{name}", "--on-full", on_full, "--json"]
        args += ["--writable"] if writable else []
        args += ["--max-size", str(max_size)] if max_size is not None else []
        with w.gate.exclusive():  # no origin write in flight: the model is the snapshot
            w.trace(f"gate create {name}")
            if self.cli():
                with self.doing(f"snapimg snapshot create {' '.join(args)}"):
                    proc = snapimg("snapshot", "create", "--control", w.control_path, *args)
                w.check_output("snapshot create", proc)
                if proc.returncode != 0:
                    w.violations.add("create", f"snapshot create {args}: {proc.stderr}")
                    return
                info: dict[str, Any] = json.loads(proc.stdout)
            else:
                with self.doing(f"control create_snapshot {name}"):
                    made, _ = w.control().create_snapshot(
                        ORIGIN, name, max_size=max_size, writable=writable, on_full=on_full
                    )
                info = made.to_json()
            content = bytearray(w.origin) if writable else bytes(w.origin)
            w.add_snap(SnapModel(name, content, writable, max_size, on_full))
        want = {"state": "valid", "writable": writable, "max_size": max_size, "on_full": on_full}
        got = {k: info.get(k) for k in want}
        if got != want:
            w.violations.add("create", f"{ORIGIN}@{name}: created as {got}, asked {want}")
        w.stats.event("snapshots_created")
        w.stats.event("snapshots_created_writable", writable)
        w.stats.event("snapshots_created_max_size", max_size is not None)

    def read(self, s: SnapModel, whole: bool) -> None:
        w = self.w
        if whole:
            off, end = 0, w.size
        else:
            off = self.rnd.randrange(w.size)
            end = min(w.size, off + self.rnd.randint(1, 16 * MiB))
        with s.guard.shared():
            if s.dropped:
                return
            h = connect(w.socket, s.export)
            try:
                check_snapshot(w, self, s, h, off, end, "lifecycle read")
            finally:
                disconnect(h)
        w.stats.op("snap_read_whole" if whole else "snap_read_part")

    def release(self, s: SnapModel) -> None:
        w = self.w
        off = self.rnd.randrange(w.size)
        length = self.rnd.choice([w.bs // 2, w.bs, 3 * w.bs + 123, MiB, 8 * MiB, w.size])
        length = min(length, w.size - off)
        blocks = whole_blocks(off, length, w.size, w.bs)
        what = f"release {s.export} [{off}, +{length})"
        with s.guard.exclusive():
            if self.cli():
                with self.doing(f"snapimg snapshot {what}"):
                    proc = snapimg(
                        "snapshot", "release", "--control", w.control_path, s.export,
                        "--offset", str(off), "--length", str(length),
                    )  # fmt: skip
                w.check_output("snapshot release", proc)
                error = proc.stderr.strip() if proc.returncode else None
                done = (blocks.start * w.bs, min(w.size, blocks.stop * w.bs) - blocks.start * w.bs)
            else:
                try:
                    with self.doing(f"control {what}"):
                        done = w.control().release(ORIGIN, s.snap, off, length)
                    error = None
                except SnapimgError as err:
                    error = str(err)
            if error is None and not blocks:
                w.violations.add("release", f"{what}: covers no whole block, yet accepted")
            elif error is None:
                want = (blocks.start * w.bs, min(w.size, blocks.stop * w.bs) - blocks.start * w.bs)
                if done != want:
                    w.violations.add("release", f"{what}: released {done}, whole blocks {want}")
                s.released.update(blocks)
                w.stats.event("releases")
            elif not blocks and "covers no whole block" in error:
                w.stats.expected("release_no_whole_block")
            elif "invalid" in error and w.confirm_invalid(s, what):
                w.stats.expected("release_invalid")
            else:
                w.violations.add("release", f"{what}: {error}")

    def drop(self, s: SnapModel) -> None:
        w = self.w
        with s.guard.exclusive():
            if s.pinned:  # a backup runs --since it
                return
            if self.cli():
                with self.doing(f"snapimg snapshot drop {s.export}"):
                    proc = snapimg("snapshot", "drop", "--control", w.control_path, s.export)
                w.check_output("snapshot drop", proc)
                if proc.returncode != 0:
                    w.violations.add("drop", f"drop {s.export}: {proc.stderr}")
            else:
                with self.doing(f"control drop_snapshot {s.export}"):
                    w.control().drop_snapshot(ORIGIN, s.snap)
            s.dropped = True
            for h in list(s.handles):  # the server cut them: the clients' handles are dead
                disconnect(h)
            s.handles.clear()
        w.forget_snap(s)
        w.stats.event("snapshots_dropped")

    def check_list(self, final: bool = False) -> None:
        """The server lists exactly the live snapshots of the models (and what a running
        backup may have created), valid unless their model allows otherwise, never past
        their max size."""
        w = self.w
        before = {s.snap for s in w.live()} | set(w.pending)
        asked = time.monotonic()
        with self.doing("control list_snapshots"):
            infos = w.control().list_snapshots()
        live = {s.snap: s for s in w.live()}
        allowed = before | set(live) | set(w.pending)
        listed = {i.snap for i in infos}
        extra = sorted(n for n in listed - allowed if final or not n.startswith("backup-"))
        missing = sorted((before & set(live)) - listed - set(w.pending))
        if extra or missing:
            w.violations.add("list", f"listed but not in the models: {extra}; "
                             f"in the models but not listed: {missing}")  # fmt: skip
        for i in infos:
            s = live.get(i.snap)
            if s is None:
                continue
            if not i.valid:
                w.accept_invalid(s, i.reason or "", "snapshot list")
            elif s.invalid_since is not None and s.invalid_since < asked:
                w.violations.add("list", f"{s.export} is valid again after it was invalid")
            elif s.max_size is not None and i.preserved_bytes > s.max_size:
                w.violations.add("list", f"{s.export} holds {i.preserved_bytes} bytes, "
                                 f"max size {s.max_size}")  # fmt: skip
