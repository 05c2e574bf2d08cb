"""The serve process's resources from /proc (resident memory, open file descriptors,
threads), sampled every second, and the watchdog: a request, command or wait of any soak
thread that has not ended within the hang timeout is a hang (the server's threads are
dumped with gdb, the run is aborted).

Resident memory is judged by its level, not by single samples: a second in which many
connections hold their request buffers at once (a backup's 4 MiB reads among the clients'
1 MiB requests) lifts one sample by half, and the next is back.  Memory that is kept
(a leak, an allocator holding freed memory) lifts the level: the median of every window
after the warm-up is held against the median of the warm-up's second half."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.soak.model import Actor, World


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int
    threads: int


def usage(pid: int) -> Usage:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Usage(rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")))


def settle(pid: int, want: Usage, timeout: float) -> Usage:
    """Usage once fds and threads are back at ``want``'s (or after ``timeout``): threads
    of closed connections take a moment to end."""
    deadline = time.monotonic() + timeout
    now = usage(pid)
    while (now.fds, now.threads) != (want.fds, want.threads) and time.monotonic() < deadline:
        time.sleep(0.2)
        now = usage(pid)
    return now


class Sampler(threading.Thread):
    def __init__(
        self, world: World, pid: int, warmup: float, hang_timeout: float,
        actors: list[Actor], server_alive: Callable[[], bool],
    ) -> None:  # fmt: skip
        super().__init__(name="soak-sampler", daemon=True)
        self.world = world
        self.pid = pid
        self.warmup = warmup
        self.hang_timeout = hang_timeout
        self.actors = actors
        self.server_alive = server_alive
        self.samples: list[tuple[float, Usage]] = []  # (seconds since start, usage)
        self.done = threading.Event()  # set before the server is stopped on purpose

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(1.0):
            if not self.server_alive():
                self.world.violations.add("server", "snapimg serve died")
                self.world.abort.set()
                return
            try:
                u = usage(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            now = time.monotonic()
            self.samples.append((now - t0, u))
            with (self.world.work / "usage.csv").open("a") as f:  # every second
                f.write(f"{now - t0:.0f},{u.rss_kib},{u.fds},{u.threads}\n")
            self.watch(now)

    def rss(self, limit: float) -> dict[str, Any]:
        """Resident memory in KiB: ``baseline`` (median of the warm-up's second half),
        ``level`` (the highest median of a window of the warm-up's length after it),
        ``peak`` (the highest sample after it), their ratios to the baseline; a violation
        when ``level_ratio`` exceeds ``limit``."""
        warm = [u.rss_kib for t, u in self.samples if self.warmup / 2 <= t < self.warmup]
        after = [(t, u.rss_kib) for t, u in self.samples if t >= self.warmup]
        window = max(self.warmup, 1.0)
        windows: dict[int, list[int]] = {}
        for t, r in after:
            windows.setdefault(int((t - self.warmup) // window), []).append(r)
        # a window needs half its samples (the last one may have just begun)
        levels = [statistics.median(rs) for rs in windows.values() if len(rs) >= window / 2]
        base = statistics.median(warm) if warm else 0
        level = max(levels, default=0)
        peak = max((r for _, r in after), default=0)
        out = {
            "baseline": base, "level": level, "peak": peak,
            "level_ratio": round(level / base, 3) if base else None,
            "peak_ratio": round(peak / base, 3) if base else None,
        }  # fmt: skip
        if not base or not levels or level > limit * base:
            self.world.violations.add(
                "rss", f"resident memory after the warm-up reached a level of {level} KiB "
                f"(median of a {window:.0f} s window), {out['level_ratio']}x the {base} KiB "
                f"of the warm-up (limit {limit}x)",
            )  # fmt: skip
        return out

    def peaks(self) -> tuple[int, int]:
        """The most file descriptors and threads seen."""
        return (
            max((u.fds for _, u in self.samples), default=0),
            max((u.threads for _, u in self.samples), default=0),
        )

    def series(self, every: float = 30) -> list[dict[str, int]]:
        out: list[dict[str, int]] = []
        for t, u in self.samples:
            if not out or t >= out[-1]["s"] + every:
                out.append({"s": int(t), "rss_kib": u.rss_kib, "fds": u.fds,
                            "threads": u.threads})  # fmt: skip
        return out

    def watch(self, now: float) -> None:
        for actor in self.actors:
            current = actor.current
            if current is not None and now - current[1] > self.hang_timeout:
                what, since = current
                dump = self.world.work / "hang-gdb.txt"
                self.world.violations.add(
                    "hang", f"{what}: no answer for {now - since:.0f} s (server threads: {dump})"
                )
                self.dump_threads(dump)
                self.world.abort.set()
                return

    def dump_threads(self, path: Path) -> None:
        if shutil.which("gdb") is None:
            path.write_text("gdb is not installed\n")
            return
        proc = subprocess.run(
            ["gdb", "-p", str(self.pid), "-batch", "-ex", "thread apply all bt"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        path.write_text(proc.stdout + proc.stderr)
