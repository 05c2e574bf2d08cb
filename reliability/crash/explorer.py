"""The crash-state explorer: record a workload, build its crash states, check each one.

:func:`record` runs a workload in a child process under the recorder and turns the log
into a :class:`~reliability.crash.timeline.Timeline` (checked against the files the run
really left: a call the recorder missed shows up there); :func:`explore` walks every
crash point of it, makes kill and power-loss states (:mod:`reliability.crash.states`),
writes each distinct one out and judges it (:mod:`reliability.crash.check`).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reliability.crash import recording
from reliability.crash.check import Checker
from reliability.crash.model import Model
from reliability.crash.states import CrashState, kill_states, materialize, power_states
from reliability.crash.timeline import Timeline, build, sweep
from reliability.crash.workload import Workload

CHILD_TIMEOUT = 300


@dataclass
class Violation:
    workload: str
    k: int  # crash point: events completed
    kind: str  # kill, kill-torn, power, live
    how: str
    rule: str  # see reliability.crash.check
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.workload} @{self.k} {self.kind} ({self.how}): {self.message}"


@dataclass
class Recorded:
    workload: Workload
    dir: Path
    root: Path  # the recorded directory: origin images and the store
    timeline: Timeline
    model: Model
    origin_paths: dict[str, Path]
    root_fid: int
    origin_fids: dict[int, Path]
    log: Path


@dataclass
class Tally:
    workloads: int = 0
    states: int = 0
    violations: list[Violation] = field(default_factory=list)
    examples: dict[str, tuple[Violation, CrashState]] = field(default_factory=dict)  # by rule

    def add(self, other: Tally) -> None:
        self.workloads += other.workloads
        self.states += other.states
        self.violations += other.violations
        for rule, ex in other.examples.items():
            self.examples.setdefault(rule, ex)

    def rules(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.rule] = out.get(v.rule, 0) + 1
        return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record(wl: Workload, workdir: Path, lib: Path, drop_sync: str | None = None) -> Recorded:
    """Run ``wl`` under the recorder in ``workdir`` (created empty)."""
    root = workdir / "root"
    root.mkdir(parents=True)
    origin_paths = {o: root / f"{o}.img" for o in wl.origins}
    for o, path in origin_paths.items():
        path.write_bytes(wl.initial(o))
        _fsync_path(path)
    _fsync_path(root)
    script = workdir / "workload.json"
    script.write_text(wl.to_json())
    log, mark = workdir / "calls.log", workdir / "marks"
    env = recording.recorder_env(lib, root, log, mark, drop_sync)
    cmd = [sys.executable, "-m", "reliability.crash.runner", str(script), str(root), str(mark)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise recording.RecorderError(f"workload {wl.name} failed: {tail}")
    ops = recording.parse_log(log.read_bytes())
    files = {path.stat().st_ino: wl.initial(o) for o, path in origin_paths.items()}
    entries = {path.name: path.stat().st_ino for path in origin_paths.values()}
    root_ino = root.stat().st_ino
    tl = build(ops, files, {root_ino: entries})
    verify_against_disk(tl, root_ino, root)
    origin_fids = {path.stat().st_ino: path for path in origin_paths.values()}
    return Recorded(wl, workdir, root, tl, Model(wl, tl.marks), origin_paths, root_ino,
                    origin_fids, log)  # fmt: skip


def verify_against_disk(tl: Timeline, root_fid: int, root: Path) -> None:
    """The timeline's end state must be what is on disk: else the recorder missed a call."""
    stack = [(root, root_fid)]
    while stack:
        path, fid = stack.pop()
        names = tl.final_dirs[fid]
        on_disk = {p.name for p in path.iterdir()}
        if set(names) != on_disk:
            raise recording.RecorderError(
                f"recording incomplete: {path} holds {sorted(on_disk)}, recorded {sorted(names)}"
            )
        for name, child in names.items():
            if child in tl.final_dirs:
                stack.append((path / name, child))
                continue
            want = tl.final[child]
            got = (path / name).read_bytes()
            if got != want.content():
                raise recording.RecorderError(
                    f"recording incomplete: {path / name} differs from its recorded content"
                )


def explore(
    rec: Recorded,
    rng: random.Random,
    samples: int = 3,
    omissions: int = 2,
    stop: Callable[[Violation], bool] | None = None,
) -> Tally:
    """Check every distinct crash state of ``rec`` (kill states with the recording's boot
    id, power states with a new one); ``stop``: end at the first violation it accepts."""
    tally = Tally(workloads=1)
    wl = rec.workload
    for m in rec.model.live_mismatches():
        tally.violations.append(Violation(wl.name, -1, "live", "", "live", m))
    checker = Checker(rec.model, rec.origin_paths)
    seen: set[bytes] = set()
    state_dir = rec.dir / "state"
    events = rec.timeline.events
    for cp in sweep(rec.timeline):
        nxt = events[cp.k] if cp.k < len(events) else None
        candidates: list[CrashState] = [
            *kill_states(cp, nxt, rng),
            *power_states(cp, rng, samples, omissions),
        ]
        for state in candidates:
            key = state.digest(rec.root_fid)
            if key in seen:
                continue
            seen.add(key)
            if state_dir.exists():
                shutil.rmtree(state_dir)
            state_dir.mkdir()
            materialize(state, rec.root_fid, state_dir, rec.origin_fids)
            tally.states += 1
            for f in checker.check(state_dir / "store", cp.k, state.power):
                v = Violation(wl.name, cp.k, state.kind, state.how, f.rule, f.message)
                tally.violations.append(v)
                tally.examples.setdefault(f.rule, (v, state))
                if stop and stop(v):
                    return tally
    return tally


def dump(rec: Recorded, v: Violation, state: CrashState, into: Path) -> None:
    """A violation for a report: the state's files (origins as plain files), the
    recording, the workload and a description of the crash point."""
    into.mkdir(parents=True)
    materialize(state, rec.root_fid, into, {})
    shutil.copy(rec.log, into / "calls.log")
    shutil.copy(rec.dir / "workload.json", into / "workload.json")
    text = f"{v}\n\n{describe_point(rec, v.k)}\n"
    (into / "README.txt").write_text(text)


def describe_point(rec: Recorded, k: int) -> str:
    """The events around crash point ``k`` and the workload steps done, for reports."""
    model = rec.model
    pt = model.point(k)
    steps = rec.workload.steps
    lines = [f"workload {rec.workload.name} ({rec.workload.durability}), crash after {k} events"]
    for i in range(min(pt.acked, len(steps))):
        lines.append(f"  done   step {i}: {steps[i].describe()} -> {model.status[i]}")
    if pt.inflight is not None:
        lines.append(f"  inflight step {pt.inflight}: {steps[pt.inflight].describe()}")
    for j in range(max(0, k - 8), min(len(rec.timeline.events), k + 2)):
        ev = rec.timeline.events[j]
        text = repr(ev)
        lines.append(f"  {'>' if j >= k else ' '} event {j}: {text[:160]}")
    return "\n".join(lines)
