#!/usr/bin/env python3
"""Benchmark `snapimg serve --backend qsd`, and the cost of each extra live snapshot.

Rows, over a unix socket on one raw file filled with data (so every copy is real):
  qsd_nosnap / qsd_snap   snapimg serve --backend qsd with 0 / 1 live snapshot:
      seq1m     1 MiB sequential writes over the whole image, first touch (qemu-img bench), MiB/s
      rand4k    4 KiB random writes at queue depth 16 (fio --ioengine=nbd), IOPS
      snapread  sequential read of the snapshot after seq1m (nbdcopy --no-extents), MiB/s
  live_snapshots  seq1m first touch with 1, 2, 4, 8 live snapshots, native and qsd backends
      (each snapshot taken before the pass, so every 1 MiB write copies for all of them)
Each measurement runs on a freshly started server.  Medians of --reps.
Usage: bench/qsd.py [--size 128] [--reps 3] [--runtime 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the workloads and their tools are bench/serve.py's, so the rows compare like with like
from serve import rand4k, run, seq1m, snapread, stop

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
COUNTS = (1, 2, 4, 8)


@contextmanager
def serve(work: Path, image: Path, backend: str, snapshots: int) -> Iterator[tuple[str, str]]:
    """snapimg serve with ``snapshots`` live snapshots; yields (origin URI, last snapshot URI)."""
    sock, ctl, store = work / "nbd.sock", work / "ctl.sock", work / "store"
    shutil.rmtree(store, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapimg.cli.main", "serve", f"disk={image}", "--socket",
         str(sock), "--control", str(ctl), "--store-dir", str(store), "--backend", backend],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 60)[0] or "ready" not in proc.stdout.readline():
            raise SystemExit(f"snapimg serve --backend {backend} did not get ready")
        snap = ""
        for i in range(snapshots):
            snap = run(sys.executable, "-m", "snapimg.cli.main", "snapshot", "create",
                       "--control", str(ctl), f"disk@b{i}").strip()  # fmt: skip
        yield f"nbd+unix:///disk?socket={sock}", snap
    finally:
        stop(proc)
        shutil.rmtree(store, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="image size in MiB (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, medians reported")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    size = args.size * MiB
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="snapimg-bench-qsd-") as tmp:
        work = Path(tmp)
        image = work / "disk.raw"
        pattern = (bytes(range(1, 256)) * 4200)[:MiB]
        with image.open("wb") as f:
            for _ in range(args.size):
                f.write(pattern)
        for _ in range(args.reps):
            for n, row in ((0, "qsd_nosnap"), (1, "qsd_snap")):
                with serve(work, image, "qsd", n) as (origin, snap):
                    add(f"{row}.seq1m", seq1m(origin, size))
                    if snap:
                        add(f"{row}.snapread", snapread(snap, size))
                with serve(work, image, "qsd", n) as (origin, _):
                    add(f"{row}.rand4k", rand4k(origin, size, args.runtime))
            for backend in ("native", "qsd"):
                for n in COUNTS:
                    with serve(work, image, backend, n) as (origin, _):
                        add(f"live.{backend}.{n}", seq1m(origin, size))
    med = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    live = {b: {str(n): med[f"live.{b}.{n}"] for n in COUNTS} for b in ("native", "qsd")}
    result = {
        "size_mib": args.size,
        "reps": args.reps,
        "units": {"seq1m": "MiB/s", "rand4k": "IOPS", "snapread": "MiB/s"},
        "qsd_backend": {
            row: {
                m: med[f"{row}.{m}"] for m in ("seq1m", "rand4k", "snapread") if f"{row}.{m}" in med
            }
            for row in ("qsd_nosnap", "qsd_snap")
        },
        "live_snapshots_seq1m": live,
        "native_8_vs_1_snapshots": round(live["native"]["8"] / live["native"]["1"], 3),
        "qsd_8_vs_1_snapshots": round(live["qsd"]["8"] / live["qsd"]["1"], 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'row':<12} {'seq1m MiB/s':>12} {'rand4k IOPS':>12} {'snapread MiB/s':>15}")
    for row, vals in result["qsd_backend"].items():  # type: ignore[attr-defined]
        print(
            f"{row:<12} {vals['seq1m']:>12.0f} {vals['rand4k']:>12.0f} "
            f"{vals.get('snapread', float('nan')):>15.0f}"
        )
    print(
        f"\nseq1m first touch (MiB/s) with N live snapshots: {'':<4}"
        + " ".join(f"{n:>7}" for n in COUNTS)
    )
    for backend, vals in live.items():
        print(f"{backend:<50}" + " ".join(f"{vals[str(n)]:>7.0f}" for n in COUNTS))
    print(
        f"native 8 vs 1: {result['native_8_vs_1_snapshots']}, "
        f"qsd 8 vs 1: {result['qsd_8_vs_1_snapshots']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
