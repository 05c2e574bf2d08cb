"""Backups at random intervals into one directory, through the CLI: `snapimg backup`
full and `--since` incrementals (over snapshots earlier backups kept with `--keep`),
some with `--sha256`; `snapimg prune` keeps the directory bounded; now and then a point
is restored while the load runs.  Every point's content is known exactly: the origin's
gate is held exclusively from the start of `snapimg backup` until its snapshot exists,
so the model's copy taken then is what the point must hold."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.backup.helpers import sha256_file
from tests.soak.model import (
    ORIGIN,
    SNAPIMG,
    Actor,
    SnapModel,
    World,
    pieces_digest,
    snapimg,
)

SNAPSHOT_WAIT = 300  # seconds for `snapimg backup` to create its snapshot


@dataclass(frozen=True)
class Point:
    sha256: str
    digest: str
    snapshot: str


class Backups(threading.Thread, Actor):
    def __init__(
        self, world: World, seed: int, interval: float, directory: Path, keep_points: int,
        first: float,
    ) -> None:  # fmt: skip
        super().__init__(name="soak-backups", daemon=True)
        self.w = world
        self.rnd = random.Random(seed)
        self.interval = interval
        self.dir = directory
        self.keep_points = keep_points
        self.points: dict[str, Point] = {}
        self.first = first  # seconds before the first backup (within the warm-up)

    def run(self) -> None:
        delay = self.first
        while not self.w.stop.wait(delay):
            if self.w.abort.is_set():
                return
            try:
                self.backup()
                if len(self.points) > self.keep_points:
                    self.prune(max(2, self.keep_points // 2))
                if self.points and self.rnd.random() < 0.3:
                    self.restore(self.rnd.choice(sorted(self.points)))
            except Exception:
                if not self.w.abort.is_set():
                    self.w.violations.add("backup", traceback.format_exc())
            delay = self.rnd.expovariate(1 / self.interval)

    def manifest(self) -> list[dict[str, object]]:
        path = self.dir / "manifest.json"
        if not path.exists():
            return []
        backups: list[dict[str, object]] = json.loads(path.read_text())["backups"]
        return backups

    def since_candidates(self) -> list[SnapModel]:
        """Live snapshots a listed point was taken from (the bases `--since` accepts)."""
        taken = {str(b["snapshot"]) for b in self.manifest()}
        return [s for s in self.w.live() if s.export in taken]

    def backup(self) -> None:
        w, rnd = self.w, self.rnd
        bases = self.since_candidates()
        since = rnd.choice(bases) if bases and rnd.random() < 0.6 else None
        keep = w.next_name("k") if rnd.random() < 0.5 else None
        sha = rnd.random() < 0.2
        args = [ORIGIN, "--to", str(self.dir), "--json"]
        args += ["--since", since.snap] if since else []
        args += ["--keep", f"{ORIGIN}@{keep}"] if keep else []
        args += ["--sha256"] if sha else []
        what = f"snapimg backup {' '.join(args)}"
        if since is not None:
            with since.guard.shared():  # a drop in progress finishes first
                if since.dropped:
                    return
                since.pinned += 1
        if keep is not None:
            w.pending.add(keep)
        try:
            with w.gate.exclusive():
                w.trace(f"gate {what}")
                proc = subprocess.Popen(
                    [*SNAPIMG, "backup", "--control", str(w.control_path), *args],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                name = self.wait_for_snapshot(proc, keep, what)
                content = bytes(w.origin) if name else None
                w.trace(f"gate open: {name} exists")
            with self.doing(what):
                out, err = proc.communicate(timeout=1800)
            self.judge(what, proc.returncode, out, err, name, content, keep, since)
        finally:
            if since is not None:
                since.pinned -= 1
            w.pending.discard(keep or "")

    def wait_for_snapshot(self, proc: subprocess.Popen[str], keep: str | None, what: str) -> str:
        """The name of the snapshot the backup created ("" if it ended first)."""
        with self.doing(f"{what}: waiting for its snapshot"):
            deadline = time.monotonic() + SNAPSHOT_WAIT
            while time.monotonic() < deadline:
                for info in self.w.control().list_snapshots():
                    if info.snap == keep or (keep is None and info.snap.startswith("backup-")):
                        return info.snap
                if proc.poll() is not None:
                    return ""
                time.sleep(0.02)
        self.w.violations.add("backup", f"{what}: no snapshot after {SNAPSHOT_WAIT} s")
        proc.kill()
        return ""

    def judge(
        self, what: str, status: int, out: str, err: str, name: str, content: bytes | None,
        keep: str | None, since: SnapModel | None,
    ) -> None:  # fmt: skip
        w = self.w
        w.check_output(what, subprocess.CompletedProcess([], status, out, err))
        if status != 0 or content is None:
            w.violations.add("backup", f"{what}: exit {status}, snapshot {name!r}: {err}")
            return
        result = json.loads(out)
        digest, sha = pieces_digest(content), hashlib.sha256(content).hexdigest()
        snapshot = f"{ORIGIN}@{name}"
        want = {"snapshot": snapshot, "kind": "incremental" if since else "full",
                "digest": digest, "snapshot_kept": keep is not None}  # fmt: skip
        if result.get("sha256") is not None:
            want["sha256"] = sha
        got = {k: result.get(k) for k in want}
        if got != want:  # the point is checked again at the end, the snapshot too
            expected = w.work / f"expected-{result.get('id')}.img"
            expected.write_bytes(content)
            w.violations.add("backup", f"{what}: made {got}, the model says {want} "
                             f"(the model's image: {expected})")  # fmt: skip
        self.points[result["id"]] = Point(sha, digest, snapshot)
        if keep is not None:
            w.add_snap(SnapModel(keep, content, False, None, "invalidate"))
        w.stats.event("backups_made")
        w.stats.event("backups_incremental" if since else "backups_full")
        w.stats.event("backups_kept", keep is not None)

    def prune(self, keep_last: int) -> None:
        with self.doing(f"snapimg prune --keep-last {keep_last}"):
            proc = snapimg("prune", self.dir, "--keep-last", str(keep_last), "--json")
        self.w.check_output("prune", proc)
        if proc.returncode != 0:
            self.w.violations.add("prune", f"prune --keep-last {keep_last}: {proc.stderr}")
            return
        listed = {str(b["id"]) for b in self.manifest()}
        if not listed <= set(self.points) or len(listed) != keep_last:
            self.w.violations.add("prune", f"after prune: points {sorted(listed)}, the soak "
                                  f"made {sorted(self.points)}")  # fmt: skip
        for gone in set(self.points) - listed:
            del self.points[gone]
        self.w.stats.event("prunes")

    def restore(self, point: str) -> bool:
        """Restore one point and compare it with its model; True when it matches."""
        target = self.w.work / f"restore-{point}.img"
        try:
            with self.doing(f"snapimg restore --backup {point}"):
                proc = snapimg("restore", self.dir, "--backup", point, "--to", target)
            self.w.check_output(f"restore {point}", proc)
            if proc.returncode != 0:
                self.w.violations.add("restore", f"restore {point}: {proc.stderr}")
                return False
            if sha256_file(target) != self.points[point].sha256:
                self.w.violations.add("restore", f"restore {point}: the image differs from "
                                      f"{self.points[point].snapshot} at its creation")  # fmt: skip
                return False
            self.w.stats.event("backups_restored")
            return True
        finally:
            target.unlink(missing_ok=True)

    def final_check(self) -> dict[str, object]:
        """At the end: every listed point restores exactly and `snapimg verify` passes."""
        listed = [str(b["id"]) for b in self.manifest()]
        if set(listed) != set(self.points):
            self.w.violations.add("backup", f"the manifest lists {listed}, the soak made "
                                  f"{sorted(self.points)}")  # fmt: skip
        restored = sum(self.restore(p) for p in listed if p in self.points)
        if not listed and not self.points:  # no backup made: nothing to verify
            return {"points_at_end": 0, "restored_at_end": 0, "verify_ok": None}
        with self.doing("snapimg verify"):
            proc = snapimg("verify", self.dir, "--json")
        self.w.check_output("verify", proc)
        verified = proc.returncode == 0
        if not verified:
            self.w.violations.add("verify", f"snapimg verify: exit {proc.returncode}: "
                                  f"{proc.stderr}{proc.stdout[-2000:]}")  # fmt: skip
        return {"points_at_end": len(listed), "restored_at_end": restored,
                "verify_ok": verified}  # fmt: skip
