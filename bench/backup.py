#!/usr/bin/env python3
"""Benchmark ``snapimg backup``, ``restore`` and ``verify`` beside ``nbdcopy`` and
``qemu-img convert`` of the same snapshot export, in the same run.

    .venv/bin/python bench/backup.py [--size 4G] [--data 1G] [--extent 1M] [--change 0.01]
                                     [--runs 1] [--no-scale] [--json]

Main row: a ``--size`` image holding ``--data`` bytes of random data in ``--extent`` runs
spread evenly (1 MiB every 4 MiB by default: every 4 MiB piece holds data, so the whole
image is hashed), served by ``snapimg serve``.  A snapshot ``disk@ref`` is copied by
``qemu-img convert`` and ``nbdcopy`` into a raw file and by ``nbdcopy`` into a new qcow2
exported by ``qemu-nbd`` (the output a backup writes); ``snapimg backup`` takes its own
snapshot of the same unchanged origin.  Every copy is timed up to and including an fsync
of its output (and, for qemu-nbd, its exit), best of ``--runs``.  Then ``--change`` of the
64 KiB blocks are rewritten at random with qemu-io and an incremental is timed (with
4 MiB pieces, 1% of blocks at random touch about 47% of the pieces, each hashed whole
again), then the same share rewritten in whole pieces (``incremental_clustered_*``); last,
a backup is stopped with SIGTERM once it has written data (``sigterm_stop_s``).

Scale row (``--no-scale`` skips it): a 10 TiB sparse origin with 1 GiB of data in 256
random 4 MiB pieces: full backup, restore and verify, each beside ``nbdcopy`` (snapshot to
raw file; backup point exported by qemu-nbd to raw file), and the backup process's peak
RSS.  Targets (issue 11): full_vs_nbdcopy >= 0.7, full_vs_nbdcopy_qcow2 >= 1.0,
incremental_vs_full <= 0.1; scale: full < 30 s, restore < 60 s, verify < 30 s, RSS < 300 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from snapimg.units import parse_size

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]
MiB = 1 << 20
PIECE = 4 * MiB


def make_image(path: Path, size: int, data: int, extent: int, seed: int) -> None:
    """``data`` bytes of random data in ``extent`` runs spread evenly over ``size``."""
    rng = random.Random(seed)
    runs = max(1, data // extent)
    stride = size // runs // extent * extent
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(runs):
            f.seek(i * stride)
            f.write(rng.randbytes(extent))
        f.flush()
        os.fsync(f.fileno())


def make_scattered(path: Path, size: int, pieces: int, seed: int) -> None:
    """``pieces`` random 4 MiB pieces of random data at random piece offsets."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for i in sorted(rng.sample(range(size // PIECE), pieces)):
            f.seek(i * PIECE)
            f.write(rng.randbytes(PIECE))
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(cmd: list[str], output: Path | None = None) -> tuple[float, str]:
    """Run ``cmd``; (seconds including an fsync of ``output``, stdout)."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:4])} failed: {proc.stderr.strip()}")
    if output is not None:
        fsync_path(output)
    return time.monotonic() - t0, proc.stdout


def timed_rss(cmd: list[str]) -> tuple[float, str, int]:
    """Like :func:`timed`, with the peak RSS (KiB) of that process itself (wait4)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:4])} failed: {err.strip()}")
    return time.monotonic() - t0, out, usage.ru_maxrss


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Server:
    def __init__(self, work: Path, image: Path) -> None:
        self.control = work / "control.sock"
        self.socket = work / "nbd.sock"
        self.proc = subprocess.Popen(
            [
                *SNAPIMG,
                "serve",
                f"disk={image}",
                "--socket",
                str(self.socket),
                "--control",
                str(self.control),
                "--store-dir",
                str(work / "store"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        if not ready or "ready" not in self.proc.stdout.readline():
            self.stop()
            raise SystemExit("bench: snapimg serve did not start")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def snapshot(self, name: str) -> None:
        subprocess.run(
            [*SNAPIMG, "snapshot", "create", "--control", str(self.control), f"disk@{name}"],
            check=True,
            capture_output=True,
        )

    def drop(self, name: str) -> None:
        subprocess.run(
            [*SNAPIMG, "snapshot", "drop", "--control", str(self.control), f"disk@{name}"],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextmanager
def qemu_nbd(image: Path, fmt: str, read_only: bool, persistent: bool = False) -> Iterator[str]:
    """qemu-nbd exporting ``image``; yields its URI; the process has exited afterwards
    (``persistent``: it serves one client after another, and is stopped at the end)."""
    sock = image.with_name(image.name + ".sock")
    cmd = ["qemu-nbd", "-f", fmt, "-k", str(sock), "--pid-file", f"{sock}.pid"]
    proc = subprocess.Popen(
        [*cmd, *(["-r"] if read_only else []), *(["-t"] if persistent else []), str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not Path(f"{sock}.pid").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench: qemu-nbd did not start")
        time.sleep(0.005)
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        if persistent:
            proc.terminate()
        proc.wait(60)  # else qemu-nbd exits when its one client disconnects


def nbdcopy_to_qcow2(uri: str, out: Path, size: int) -> float:
    """nbdcopy from ``uri`` into a new qcow2 exported by qemu-nbd: the same output as a
    backup point.  Timed from the copy's start to qemu-nbd's exit and an fsync."""
    remove(out)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), str(size)], check=True)
    with qemu_nbd(out, "qcow2", read_only=False) as dst:
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", uri, dst], check=True)
    fsync_path(out)
    return time.monotonic() - t0


def change_blocks(uri: str, size: int, fraction: float, block: int, seed: int, run: int = 1) -> int:
    """Rewrite ``fraction`` of the blocks: at random, or in aligned runs of ``run`` blocks."""
    rng = random.Random(seed)
    n = max(1, round(size // block * fraction))
    cmds: list[str] = []
    for r in rng.sample(range(size // (block * run)), max(1, n // run)):
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {r * run * block} {run * block}"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], check=True, stdout=subprocess.DEVNULL)
    return n // run * run


def sigterm_stop(ctl: Path, bk: Path) -> float:
    """Seconds from SIGTERM to the exit of a backup that is writing its file."""
    remove(bk)
    proc = subprocess.Popen(
        [*SNAPIMG, "backup", "--control", str(ctl), "disk", "--to", str(bk)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tmp = bk / ".b0001.qcow2.tmp"
    while not (tmp.exists() and tmp.stat().st_blocks * 512 > 16 * MiB):
        if proc.poll() is not None:
            raise SystemExit("bench: the backup ended before it could be stopped")
        time.sleep(0.002)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    dt = time.monotonic() - t0
    if proc.returncode != 143:
        raise SystemExit(f"bench: a stopped backup exited {proc.returncode}")
    return dt


def run_main(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size, data, extent = parse_size(args.size), parse_size(args.data), parse_size(args.extent)
    image = work / "disk.img"
    make_image(image, size, data, extent, seed=1)
    srv = Server(work, image)
    try:
        ctl = str(srv.control)
        srv.snapshot("ref")
        uri = srv.uri("disk@ref")
        best: dict[str, float] = {}
        full: dict[str, Any] = {}

        def keep(name: str, t: float) -> None:
            best[name] = min(best.get(name, t), t)

        for _ in range(args.runs):
            for name, cmd, out in (
                (
                    "qemu_img_convert_s",
                    ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(work / "qi.raw")],
                    work / "qi.raw",
                ),
                ("nbdcopy_s", ["nbdcopy", uri, str(work / "nc.raw")], work / "nc.raw"),
            ):
                remove(out)
                keep(name, timed(cmd, out)[0])
                remove(out)
            keep("nbdcopy_qcow2_s", nbdcopy_to_qcow2(uri, work / "nc.qcow2", size))
            remove(work / "nc.qcow2")
            bk = work / "backups"
            remove(bk)
            t, out_json = timed(
                [*SNAPIMG, "backup", "--control", ctl, "disk", "--to", str(bk), "--json"]
            )
            if t < best.get("backup_full_s", float("inf")):
                full = json.loads(out_json)
            keep("backup_full_s", t)
        srv.drop("ref")
        # the kept snapshot for the incremental
        bk = work / "backups"
        remove(bk)
        timed(
            [
                *SNAPIMG,
                "backup",
                "--control",
                ctl,
                "disk",
                "--to",
                str(bk),
                "--keep",
                "disk@base",
                "--json",
            ]
        )
        block = full["block_size"]
        changed = change_blocks(srv.uri("disk"), size, args.change, block, seed=2)
        t_inc, out_json = timed(
            [
                *SNAPIMG,
                "backup",
                "--control",
                ctl,
                "disk",
                "--to",
                str(bk),
                "--since",
                "base",
                "--keep",
                "disk@inc",
                "--json",
            ]
        )
        inc = json.loads(out_json)
        # the same share of blocks, changed in whole pieces (as a guest writing files
        # does more than scattered 64 KiB blocks): the cost follows the changed pieces
        change_blocks(srv.uri("disk"), size, args.change, block, seed=4, run=PIECE // block)
        t_clustered, out_json = timed(
            [
                *SNAPIMG,
                "backup",
                "--control",
                ctl,
                "disk",
                "--to",
                str(bk),
                "--since",
                "inc",
                "--json",
            ]
        )
        clustered = json.loads(out_json)
        stop_s = sigterm_stop(srv.control, work / "stopped")
    finally:
        srv.stop()
    t_full = best["backup_full_s"]
    return {
        "size": size,
        "data": data,
        "extent": extent,
        "runs": args.runs,
        "qemu_img_convert_s": round(best["qemu_img_convert_s"], 3),
        "nbdcopy_s": round(best["nbdcopy_s"], 3),
        "nbdcopy_qcow2_s": round(best["nbdcopy_qcow2_s"], 3),
        "backup_full_s": round(t_full, 3),
        "backup_full_copy_s": full["copy_duration"],
        "backup_full_bytes_read": full["bytes_read"],
        "backup_full_bytes_skipped": full["bytes_skipped"],
        "backup_full_pieces_hashed": full["pieces_hashed"],
        "full_vs_nbdcopy": round(best["nbdcopy_s"] / t_full, 3),
        "full_vs_nbdcopy_qcow2": round(best["nbdcopy_qcow2_s"] / t_full, 3),
        "changed_blocks_written": changed,
        "incremental_s": round(t_inc, 3),
        "incremental_copy_s": inc["copy_duration"],
        "incremental_bytes_read": inc["bytes_read"],
        "incremental_changed_blocks": inc["changed_blocks"],
        "incremental_pieces_hashed": inc["pieces_hashed"],
        "incremental_vs_full": round(t_inc / t_full, 3),
        "incremental_clustered_s": round(t_clustered, 3),
        "incremental_clustered_pieces_hashed": clustered["pieces_hashed"],
        "incremental_clustered_vs_full": round(t_clustered / t_full, 3),
        "sigterm_stop_s": round(stop_s, 3),
        "target_full_vs_nbdcopy_0_7": best["nbdcopy_s"] / t_full >= 0.7,
        "target_full_vs_nbdcopy_qcow2_1_0": best["nbdcopy_qcow2_s"] / t_full >= 1.0,
        "target_incremental_vs_full_0_1": t_inc / t_full <= 0.1,
    }


def run_scale(work: Path) -> dict[str, Any]:
    size = 10 << 40
    image = work / "big.img"
    make_scattered(image, size, pieces=256, seed=3)
    srv = Server(work, image)
    try:
        srv.snapshot("ref")
        uri = srv.uri("disk@ref")
        out = work / "nc.raw"
        t_nbdcopy = timed(["nbdcopy", uri, str(out)], out)[0]
        remove(out)
        srv.drop("ref")
        bk = work / "scale-backups"
        t_full, full_json, rss = timed_rss(
            [*SNAPIMG, "backup", "--control", str(srv.control), "disk", "--to", str(bk), "--json"]
        )
        full = json.loads(full_json)
    finally:
        srv.stop()
    point = bk / full["file"]
    st = point.stat()
    with qemu_nbd(point, "qcow2", read_only=True) as src:
        t_nbdcopy_point = timed(["nbdcopy", src, str(out)], out)[0]
    remove(out)
    restored = work / "restored.img"
    t_restore = timed([*SNAPIMG, "restore", str(bk), "--to", str(restored)])[0]
    remove(restored)
    t_verify = timed([*SNAPIMG, "verify", str(bk)])[0]
    return {
        "size": size,
        "data": 256 * PIECE,
        "nbdcopy_snapshot_s": round(t_nbdcopy, 3),
        "backup_full_s": round(t_full, 3),
        "backup_peak_rss_mib": round(rss / 1024, 1),
        "point_apparent_mib": round(st.st_size / MiB, 1),  # no reliance on holes:
        "point_held_mib": round(st.st_blocks * 512 / MiB, 1),  # the two are about equal
        "nbdcopy_point_s": round(t_nbdcopy_point, 3),
        "restore_s": round(t_restore, 3),
        "verify_s": round(t_verify, 3),
        "target_full_30_s": t_full < 30,
        "target_restore_60_s": t_restore < 60,
        "target_verify_30_s": t_verify < 30,
        "target_rss_300_mib": rss / 1024 < 300,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size", default="4G")
    p.add_argument("--data", default="1G")
    p.add_argument("--extent", default="1M", help="length of each data run (default 1M)")
    p.add_argument("--change", type=float, default=0.01, help="fraction of blocks changed")
    p.add_argument("--runs", type=int, default=1, help="take the best of N full copies")
    p.add_argument("--no-scale", action="store_true", help="skip the 10 TiB row")
    p.add_argument("--workdir", type=Path, help="default: a temporary directory in /var/tmp")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapimg-bench-backup-", dir=args.workdir or "/var/tmp"))
    try:
        (work / "main").mkdir()
        result = run_main(args, work / "main")
        remove(work / "main")
        if not args.no_scale:
            (work / "scale").mkdir()
            result["scale"] = run_scale(work / "scale")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:34} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
