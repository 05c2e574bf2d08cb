#!/usr/bin/env python3
"""Benchmark ``snapimg backup``: full backup against ``qemu-img convert`` and ``nbdcopy`` of
the same snapshot export in the same run, and an incremental after a fraction of the
blocks changed.

    .venv/bin/python bench/backup.py [--size 4G] [--data 1G] [--change 0.01] [--runs 1] [--json]

The image is sparse with ``--data`` bytes of random data in 1 MiB extents spread evenly.
One ``snapimg serve`` serves it; a snapshot ``disk@ref`` is copied by qemu-img convert and
by nbdcopy; ``snapimg backup`` takes its own snapshot of the same (unchanged) origin.
Every copy is timed up to and including an fsync of its output, best of ``--runs``.
``backup_full_s`` is the whole command (process start, snapshot, copy, read-back verify,
sha256 of the image, manifest, drop); ``backup_full_copy_s`` is its copy phase as reported
in its JSON (with the sha256 computed alongside); ``copy_engine_s`` is the same copy run
in this process without the sha256 (the work nbdcopy does, plus the read-back check).
Targets: full_vs_faster >= 0.9 (throughput relative to the faster of the two tools),
incremental_vs_full <= 0.05 (time).
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
from pathlib import Path
from typing import Any

from snapimg.units import parse_size

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]
MiB = 1 << 20


def make_image(path: Path, size: int, data: int, seed: int) -> None:
    rng = random.Random(seed)
    extents = max(1, data // MiB)
    stride = size // extents
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(extents):
            f.seek(i * stride)
            f.write(rng.randbytes(MiB))
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(cmd: list[str], output: Path | None) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {cmd[0]} failed: {proc.stderr.strip()}")
    if output is not None:
        fsync_path(output)
    return time.monotonic() - t0, proc.stdout


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
            [*SNAPIMG, "serve", f"disk={image}", "--socket", str(self.socket),
             "--control", str(self.control), "--store-dir", str(work / "store")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or "ready" not in self.proc.stdout.readline():
            self.stop()
            raise SystemExit("bench: snapimg serve did not start")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def copy_engine(uri: str, out: Path) -> float:
    """The backup's copy alone (sparse pipelined reads, writes, read-back compare; no sha256),
    in this process: what ``nbdcopy`` does, plus the read-back check."""
    from snapimg.backup.copy import NbdSource, copy_ranges

    t0 = time.monotonic()
    with NbdSource(uri) as src:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, src.size)
            copy_ranges(src, fd, [(0, src.size)], hash_stream=False)
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def change_blocks(uri: str, size: int, fraction: float, block: int, seed: int) -> int:
    rng = random.Random(seed)
    n = max(1, round(size // block * fraction))
    blocks = rng.sample(range(size // block), n)
    cmds: list[str] = []
    for b in blocks:
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {b * block} {block}"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], check=True,
                   stdout=subprocess.DEVNULL)
    return n


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size, data = parse_size(args.size), parse_size(args.data)
    image = work / "disk.img"
    make_image(image, size, data, seed=1)
    srv = Server(work, image)
    try:
        ctl = str(srv.control)
        subprocess.run([*SNAPIMG, "snapshot", "create", "--control", ctl, "disk@ref"],
                       check=True, capture_output=True)
        uri = srv.uri("disk@ref")
        best: dict[str, float] = {}
        full: dict[str, Any] = {}
        for _ in range(args.runs):
            for name, cmd, out in (
                ("qemu_img_convert_s", ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                        uri, str(work / "qi.raw")], work / "qi.raw"),
                ("nbdcopy_s", ["nbdcopy", uri, str(work / "nc.raw")], work / "nc.raw"),
            ):
                remove(out)
                t, _ = timed(cmd, out)
                best[name] = min(best.get(name, t), t)
                remove(out)
            out = work / "engine.raw"
            remove(out)
            t = copy_engine(uri, out)
            best["copy_engine_s"] = min(best.get("copy_engine_s", t), t)
            remove(out)
            bk = work / "backups"
            remove(bk)
            t, out_json = timed([*SNAPIMG, "backup", "--control", ctl, "disk", "--to", str(bk),
                                 "--json"], None)
            if t < best.get("backup_full_s", float("inf")):
                best["backup_full_s"] = t
                full = json.loads(out_json)
        # the kept snapshot for the incremental
        remove(work / "backups")
        bk = work / "backups"
        _, out_json = timed([*SNAPIMG, "backup", "--control", ctl, "disk", "--to", str(bk),
                             "--keep", "disk@base", "--json"], None)
        subprocess.run([*SNAPIMG, "snapshot", "drop", "--control", ctl, "disk@ref"],
                       check=True, capture_output=True)
        changed = change_blocks(srv.uri("disk"), size, args.change, full["block_size"], seed=2)
        t_inc, out_json = timed([*SNAPIMG, "backup", "--control", ctl, "disk", "--to", str(bk),
                                 "--since", "base", "--json"], None)
        inc = json.loads(out_json)
    finally:
        srv.stop()
    faster = min(best["qemu_img_convert_s"], best["nbdcopy_s"])
    return {
        "size": size, "data": data, "runs": args.runs,
        "qemu_img_convert_s": round(best["qemu_img_convert_s"], 3),
        "nbdcopy_s": round(best["nbdcopy_s"], 3),
        "backup_full_s": round(best["backup_full_s"], 3),
        "backup_full_copy_s": full["copy_duration"],
        "backup_full_bytes_read": full["bytes_read"],
        "backup_full_bytes_skipped": full["bytes_skipped"],
        "full_vs_faster": round(faster / best["backup_full_s"], 3),
        "full_copy_vs_faster": round(faster / full["copy_duration"], 3),
        "copy_engine_s": round(best["copy_engine_s"], 3),
        "copy_engine_vs_faster": round(faster / best["copy_engine_s"], 3),
        "changed_blocks_written": changed,
        "incremental_s": round(t_inc, 3),
        "incremental_copy_s": inc["copy_duration"],
        "incremental_hash_s": inc["hash_duration"],
        "incremental_bytes_read": inc["bytes_read"],
        "incremental_changed_blocks": inc["changed_blocks"],
        "incremental_vs_full": round(t_inc / best["backup_full_s"], 3),
        "incremental_copy_vs_full_copy": round(inc["copy_duration"] / full["copy_duration"], 3),
        "target_full_vs_faster_0_9": faster / best["backup_full_s"] >= 0.9,
        "target_incremental_vs_full_0_05": t_inc / best["backup_full_s"] <= 0.05,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size", default="4G")
    p.add_argument("--data", default="1G")
    p.add_argument("--change", type=float, default=0.01, help="fraction of blocks changed")
    p.add_argument("--runs", type=int, default=1, help="take the best of N full copies")
    p.add_argument("--workdir", type=Path, help="default: a temporary directory in /var/tmp")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapimg-bench-backup-", dir=args.workdir or "/var/tmp"))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:34} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
