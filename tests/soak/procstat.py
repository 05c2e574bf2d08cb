"""The serve process's resources from /proc (resident memory, open file descriptors,
threads), sampled every second, and the watchdog: a request, command or wait of any soak
thread that has not ended within the hang timeout is a hang (the server's threads are
dumped with gdb, the run is aborted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
        self.warmup_until = time.monotonic() + warmup  # the RSS baseline is taken then
        self.hang_timeout = hang_timeout
        self.actors = actors
        self.server_alive = server_alive
        self.rss_baseline = 0  # the highest RSS of the warm-up: its working set
        self.rss_peak = 0  # the highest after it
        self.fds_peak = 0
        self.threads_peak = 0
        self.series: list[tuple[int, int, int, int]] = []  # every 30 s: s, RSS, fds, threads
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
            with (self.world.work / "usage.csv").open("a") as f:  # every second
                f.write(f"{now - t0:.0f},{u.rss_kib},{u.fds},{u.threads}\n")
            if not self.series or now - t0 >= self.series[-1][0] + 30:
                self.series.append((int(now - t0), u.rss_kib, u.fds, u.threads))
            self.fds_peak = max(self.fds_peak, u.fds)
            self.threads_peak = max(self.threads_peak, u.threads)
            if now < self.warmup_until:
                self.rss_baseline = max(self.rss_baseline, u.rss_kib)
            else:
                self.rss_peak = max(self.rss_peak, u.rss_kib)
            self.watch(now)

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
