#!/usr/bin/env python3
"""Soak `snapimg serve` (issue 14, "Long runs"; not run in CI).

One `snapimg serve` (compiled data path, or `--datapath python`) on a real raw image (a
file on disk with data, written zeros and holes; the last block partial).  For
`--minutes` (30): 8 clients, each on its own NBD connections (libnbd), write, zero, trim,
flush, read and query block status at random (any alignment and length, FUA mixed in)
and read, write and trim snapshots; at random intervals snapshots are created (read-only
and --writable, some with --max-size under either --on-full policy), read whole or in
parts, released and dropped (tests/soak/lifecycle.py), and backed up with `snapimg
backup` (full and --since incrementals, some --keep, some --sha256) into one directory
that `snapimg prune` keeps bounded (tests/soak/backups.py).  Every reply is checked
against a model of the origin (what each client had acknowledged) and of every snapshot
(the origin model when it was created, made atomic by a gate the clients' writes hold;
see tests/soak/locks.py).

At the end: the server lists exactly the model's snapshots; each reads exactly its model
(or is invalid because its --max-size was reached); the origin equals its model over NBD
and, after SIGTERM, on disk; every backup point restores exactly and `snapimg verify`
passes; after a restart on the same store every snapshot still reads its model.  The
serve process's resident memory after the warm-up stays within 1.2x of its value then;
its open file descriptors and threads, once the clients have disconnected, are back at
their baseline (taken after start, once the control socket's thread pool had its
threads, before any NBD connection).  No traceback in the server's log; any request
without an answer for --hang-timeout seconds is a hang (threads dumped with gdb).

Usage: bench/soak.py [--minutes 30] [--size 128] [--clients 8] [--datapath compiled|python]
                     [--seed 1] [--until EVENT=N ...] [--dir DIR] [--keep-dir] [--json]
Exit status 0 when no violation was found, 1 otherwise (the work directory is then kept).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the soak's parts live in tests/soak (its smoke test too)

from tests.interop.serving import Serve  # noqa: E402
from tests.soak.backups import Backups  # noqa: E402
from tests.soak.clients import Client  # noqa: E402
from tests.soak.lifecycle import Lifecycle  # noqa: E402
from tests.soak.model import ORIGIN, Actor, World, connect, disconnect  # noqa: E402
from tests.soak.procstat import Sampler, Usage, settle, usage  # noqa: E402
from tests.soak.verify import check_origin, check_snapshot  # noqa: E402

# events --until may wait for (counted by tests/soak/lifecycle.py and backups.py)
EVENTS = ("snapshots_created", "snapshots_dropped", "releases", "backups_made",
          "backups_incremental", "prunes")  # fmt: skip

MiB = 1 << 20


def make_image(path: Path, size: int, seed: int) -> bytearray:
    """Random data in half of the MiB pieces, written zeros in a fifth, holes elsewhere."""
    rnd = random.Random(seed)
    image = bytearray(size)
    with path.open("wb") as f:
        for pos in range(0, size, MiB):
            n, r = min(MiB, size - pos), rnd.random()
            if r < 0.5:
                image[pos : pos + n] = rnd.randbytes(n)
            if r < 0.7:
                f.seek(pos)
                f.write(image[pos : pos + n])
        f.truncate(size)
    return image


def start_server(work: Path, image: Path, store: Path, block_size: int, datapath: str) -> Serve:
    os.environ["SNAPIMG_DATAPATH"] = datapath
    server = Serve(work, [f"{ORIGIN}={image}"], "--block-size", str(block_size), "-v",
                   store=store)  # fmt: skip
    if f"datapath={datapath}" not in server.ready_line:
        server.kill()
        raise SystemExit(f"soak: serve did not start the {datapath} data path: {server.ready_line}")
    return server


def prime_control(world: World, pid: int) -> Usage:
    """Concurrent control requests give the server's thread pool its threads (it keeps
    them, idle, by design); then the baseline, with no NBD client connected."""
    threads = [
        threading.Thread(target=lambda: [world.control().list_snapshots() for _ in range(3)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1)
    return usage(pid)


def final_snapshots(
    world: World, lifecycle: Lifecycle, checker: Actor, what: str
) -> dict[str, int]:
    """Every live snapshot read whole and compared (no other soak thread runs)."""
    lifecycle.check_list(final=True)
    counts = {"ok": 0, "invalid": 0, "bad": 0}
    for s in world.live():
        h = connect(world.socket, s.export)
        try:
            counts[check_snapshot(world, checker, s, h, 0, world.size, what)] += 1
        finally:
            disconnect(h)
    return counts


def check_log(world: World, server: Serve, which: str) -> None:
    log = server.stderr()
    for marker in ("Traceback", "InternalError"):
        if marker in log:
            at = log.index(marker)
            world.violations.add("log", f"{which} server log: {log[max(0, at - 500) : at + 3000]}")
            return


def stop_server(world: World, server: Serve, which: str) -> int:
    status = server.stop(timeout=300)
    if status != 143:
        world.violations.add("server", f"{which} server: exit {status} after SIGTERM, not 143")
    check_log(world, server, which)
    return status


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    size, bs = args.size * MiB - 3 * 512, args.block_size  # the last block is partial
    image_path, store = work / "disk.img", work / "store"
    image = make_image(image_path, size, args.seed)
    server = start_server(work, image_path, store, bs, args.datapath)
    pid = server.proc.pid
    world = World(bytes(image), bs, server.socket, server.control, work)
    del image
    if args.trace:
        world.trace_file = (work / "trace.log").open("w")
    out: dict[str, Any] = {
        "datapath": args.datapath, "minutes": args.minutes, "size": size, "block_size": bs,
        "clients": args.clients, "seed": args.seed,
    }  # fmt: skip
    sampler: Sampler | None = None
    actors: list[Actor] = []
    try:
        baseline = prime_control(world, pid)
        clients = [Client(world, i, args.seed * 1000 + i) for i in range(args.clients)]
        lifecycle = Lifecycle(world, args.seed + 1, args.event_interval, args.max_live)
        duration = args.minutes * 60
        warmup = args.warmup if args.warmup is not None else min(60.0, duration / 4)
        backups = Backups(world, args.seed + 2, args.backup_interval, work / "backups",
                          args.keep_points, first=warmup / 4)  # fmt: skip
        checker = Actor()  # the reads at the end
        actors = [*clients, lifecycle, backups, checker]
        sampler = Sampler(world, pid, warmup, args.hang_timeout, actors,
                          lambda: server.proc.poll() is None)  # fmt: skip
        t0 = time.monotonic()
        for t in [*clients, lifecycle, backups, sampler]:
            t.start()
        progress(world, sampler, t0, t0 + duration)
        out["extended_s"] = until_counts(world, dict(args.until), args.until_limit)
        world.stop.set()
        for t in [*clients, lifecycle]:
            t.join(args.hang_timeout + 60)
        backups.join(1800)
        out["duration_s"] = round(time.monotonic() - t0, 1)
        if world.abort.is_set():
            server.kill()
        else:
            finish(world, server, lifecycle, backups, checker, args, baseline, sampler, out)
    except Exception:
        world.violations.add("soak", traceback.format_exc())
    finally:
        if sampler is not None:
            sampler.done.set()
        server.kill()
    out.update(world.figures())
    slow = max(a.slowest for a in actors) if actors else (0.0, "")
    out["slowest_request"] = {"s": round(slow[0], 2), "what": slow[1]}
    out["violations"] = world.violations.count
    out["violation_details"] = world.violations.details
    out["total_s"] = round(time.monotonic() - t_start, 1)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def finish(world: World, server: Serve, lifecycle: Lifecycle, backups: Backups, checker: Actor,
           args: argparse.Namespace, baseline: Usage, sampler: Sampler,
           out: dict[str, Any]) -> None:  # fmt: skip
    """The checks at the end (the load has stopped, every soak thread has ended)."""
    end = settle(server.proc.pid, baseline, 60)
    out["snapshots_at_end"] = final_snapshots(world, lifecycle, checker, "final read")
    h = connect(world.socket, ORIGIN)
    try:
        check_origin(world, checker, h, "final read")
    finally:
        disconnect(h)
    out["backups_at_end"] = backups.final_check()
    sampler.done.set()
    out["server_exit"] = stop_server(world, server, "first")
    image_path = world.work / "disk.img"
    if image_path.read_bytes() != world.origin:
        world.violations.add("data", "the image file differs from the origin model")
    out["after_restart"] = restart(world, lifecycle, checker, image_path, args)
    out["resources"] = resources(world, baseline, sampler, end, args.rss_limit)


def restart(world: World, lifecycle: Lifecycle, checker: Actor, image: Path,
            args: argparse.Namespace) -> dict[str, int]:  # fmt: skip
    """A new server on the same store: every snapshot reads its model again."""
    again = world.work / "restart"
    again.mkdir()
    server = start_server(again, image, world.work / "store", args.block_size, args.datapath)
    try:
        world.socket, world.control_path = server.socket, server.control
        counts = final_snapshots(world, lifecycle, checker, "read after restart")
        stop_server(world, server, "restarted")
        return counts
    finally:
        server.kill()


def resources(
    world: World, baseline: Usage, sampler: Sampler, end: Usage, limit: float
) -> dict[str, Any]:
    rss = sampler.rss(limit)
    if (end.fds, end.threads) != (baseline.fds, baseline.threads):
        world.violations.add(
            "leak", f"after the clients left: {end.fds} fds, {end.threads} threads; "
            f"baseline {baseline.fds} fds, {baseline.threads} threads",
        )  # fmt: skip
    fds_peak, threads_peak = sampler.peaks()
    return {
        "rss_kib": {"start": baseline.rss_kib, **rss, "end": end.rss_kib},
        "fds": {"baseline": baseline.fds, "peak": fds_peak, "end": end.fds},
        "threads": {"baseline": baseline.threads, "peak": threads_peak, "end": end.threads},
        "series": sampler.series(),
    }


def progress(world: World, sampler: Sampler, t0: float, deadline: float) -> None:
    """Wait for the end of the load (or an abort), a line on stderr every minute."""
    next_line = t0 + 60
    while not world.abort.is_set() and time.monotonic() < deadline:
        world.abort.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        if time.monotonic() >= next_line:
            next_line += 60
            ops = sum(world.stats.ops.values())
            rss = sampler.samples[-1][1].rss_kib if sampler.samples else None
            print(f"soak: {int(time.monotonic() - t0)} s, {ops} requests, "
                  f"{len(world.live())} snapshots, {world.violations.count} violations, "
                  f"RSS {rss} KiB", file=sys.stderr, flush=True)  # fmt: skip


def until_counts(world: World, want: dict[str, int], limit: float) -> float:
    """Keep the load going past --minutes until each event count of ``want`` (--until) is
    reached, for at most ``limit`` seconds; the seconds added (a loaded machine gets
    through fewer backups and lifecycle commands in the same time)."""
    start = time.monotonic()

    def short() -> bool:
        return any(world.stats.events[name] < n for name, n in want.items())

    while short() and not world.abort.is_set() and time.monotonic() - start < limit:
        world.abort.wait(0.2)
    return round(time.monotonic() - start, 1)


def count_spec(text: str) -> tuple[str, int]:
    name, sep, n = text.partition("=")
    if not sep or not n.isdigit() or name not in EVENTS:
        raise argparse.ArgumentTypeError(f"expected EVENT=N, EVENT one of {', '.join(EVENTS)}")
    return name, int(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="load duration (30)")
    ap.add_argument("--size", type=int, default=128, help="image size in MiB (128)")
    ap.add_argument("--block-size", type=int, default=65536, help="engine block size (65536)")
    ap.add_argument("--clients", type=int, default=8, help="NBD clients (8)")
    ap.add_argument("--datapath", choices=["compiled", "python"], default="compiled")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--event-interval",
        type=float,
        default=2.0,
        help="mean seconds between snapshot lifecycle actions (2)",
    )
    ap.add_argument(
        "--backup-interval", type=float, default=30.0, help="mean seconds between backups (30)"
    )
    ap.add_argument("--max-live", type=int, default=6, help="snapshots the lifecycle keeps (6)")
    ap.add_argument(
        "--keep-points", type=int, default=8, help="backup points before a prune halves them (8)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        help="seconds before the RSS baseline (default: a quarter of the run, at most 60)",
    )
    ap.add_argument(
        "--rss-limit",
        type=float,
        default=1.2,
        help="resident memory level after the warm-up / in it (1.2)",
    )
    ap.add_argument(
        "--hang-timeout",
        type=float,
        default=300.0,
        help="seconds without an answer that make a hang (300)",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="log every origin write and snapshot creation to WORK/trace.log",
    )
    ap.add_argument(
        "--until",
        type=count_spec,
        action="append",
        default=[],
        metavar="EVENT=N",
        help="go on past --minutes until EVENT happened N times (repeatable)",
    )
    ap.add_argument(
        "--until-limit",
        type=float,
        default=300.0,
        help="seconds --until may add at most (300)",
    )
    ap.add_argument("--dir", type=Path, help="parent of the work directory (default: TMPDIR)")
    ap.add_argument("--keep-dir", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapimg-soak-", dir=args.dir))
    out = soak(args, work)
    keep = args.keep_dir or out["violations"] > 0
    out["work_dir"] = str(work) if keep else None
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"soak: {out.get('duration_s')} s, {sum(out['ops'].values())} requests, "
              f"snapshots {out['snapshots']}, backups {out['backups']}, "
              f"violations: {out['violations']}")  # fmt: skip
        for line in out["violation_details"]:
            print(f"  {line}")
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
