#!/usr/bin/env python3
"""Benchmark `snapimg serve` against qemu-storage-daemon over a unix socket.

Configurations, all on the same raw file (filled with data, so every copy is real):
  (a) snapimg serve, no snapshot        (c) qemu-storage-daemon NBD export, no filter
  (b) snapimg serve + 1 live snapshot   (d) qemu-storage-daemon copy-before-write +
                                            snapshot-access (docs: shared/notes/qemu-fleecing.md)
Workloads (each on a freshly started server, so "first touch" means it):
  seq1m   1 MiB sequential writes over the whole image (qemu-img bench -w -s 1M -d 16)
  rand4k  4 KiB random writes at queue depth 16 (fio --ioengine=nbd), IOPS
  snapread  sequential read of the snapshot after seq1m rewrote everything
            (nbdcopy --no-extents SNAPSHOT null:), MiB/s
  qd1_512_write / qd1_512_read / qd1_512_snapread
            512 B sequential requests at queue depth 1 (qemu-img bench -d 1 -s 512
            -t none -c COUNT [-w]), requests/s: per-request latency, what a BIOS or
            DOS guest's IDE disk pays; writes first (with a snapshot: first touches),
            then reads of the origin, then of the snapshot
Usage: bench/serve.py [--size 256M] [--reps 3] [--qd1-count 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if line:
                return line
        if proc.poll() is not None:
            break
    raise SystemExit("server did not get ready")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def snapimg_serve(work: Path, image: Path, snapshot: bool) -> Iterator[tuple[str, str]]:
    sock, ctl, store = work / "nbd.sock", work / "ctl.sock", work / "store"
    shutil.rmtree(store, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapimg.cli.main", "serve", f"disk={image}", "--socket",
         str(sock), "--control", str(ctl), "--store-dir", str(store)],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_line(proc, 60)
        if snapshot:
            run(
                sys.executable,
                "-m",
                "snapimg.cli.main",
                "snapshot",
                "create",
                "--control",
                str(ctl),
                "disk@bench",
            )
        snap = f"nbd+unix:///disk@bench?socket={sock}" if snapshot else ""
        yield f"nbd+unix:///disk?socket={sock}", snap
    finally:
        stop(proc)
        shutil.rmtree(store, ignore_errors=True)


@contextmanager
def qsd_serve(work: Path, image: Path, cbw: bool) -> Iterator[tuple[str, str]]:
    sock, target = work / "qsd.sock", work / "fleece.raw"
    target.unlink(missing_ok=True)
    args = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=origin-file,filename={image}",
            "--blockdev", "driver=raw,node-name=origin,file=origin-file"]  # fmt: skip
    top = "origin"
    if cbw:
        with target.open("wb") as f:
            f.truncate(image.stat().st_size)
        args += [
            "--blockdev", f"driver=file,node-name=fleece,filename={target},discard=unmap",
            "--blockdev", "driver=copy-before-write,node-name=cbw,file=origin,target=fleece",
            "--blockdev", "driver=snapshot-access,node-name=snap,file=cbw,discard=unmap",
        ]  # fmt: skip
        top = "cbw"
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", f"type=nbd,id=e0,node-name={top},name=disk,writable=on"]  # fmt: skip
    if cbw:
        args += ["--export", "type=nbd,id=e1,node-name=snap,name=disk@bench"]
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("qemu-storage-daemon did not start")
            time.sleep(0.05)
        snap = f"nbd+unix:///disk@bench?socket={sock}" if cbw else ""
        yield f"nbd+unix:///disk?socket={sock}", snap
    finally:
        stop(proc)
        target.unlink(missing_ok=True)


def seq1m(uri: str, size: int) -> float:
    """MiB/s of 1 MiB sequential writes over the whole export."""
    count = size // MiB
    out = run("qemu-img", "bench", "-w", "-f", "raw", "-s", "1M", "-d", "16", "-c", str(count),
              uri)  # fmt: skip
    return count / bench_seconds(out)


def bench_seconds(out: str) -> float:
    match = re.search(r"Run completed in ([\d.]+) seconds", out)
    if match is None:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    return float(match.group(1))


def qd1_512(uri: str, count: int, write: bool) -> float:
    """Requests/s of 512 B sequential requests at queue depth 1."""
    args = ["-w"] if write else []
    out = run("qemu-img", "bench", *args, "-f", "raw", "-t", "none", "-s", "512", "-d", "1",
              "-c", str(count), uri)  # fmt: skip
    return count / bench_seconds(out)


def rand4k(uri: str, size: int, runtime: int) -> float:
    """IOPS of 4 KiB random writes at queue depth 16."""
    out = run("fio", "--name=rand4k", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
              "--bs=4k", "--iodepth=16", f"--size={size}", f"--runtime={runtime}",
              "--time_based", "--randrepeat=1", "--output-format=json")  # fmt: skip
    return float(json.loads(out[out.index("{") :])["jobs"][0]["write"]["iops"])


def snapread(uri: str, size: int) -> float:
    t0 = time.monotonic()
    run("nbdcopy", "--no-extents", uri, "null:")
    return size / MiB / (time.monotonic() - t0)


def measure(
    serve: Callable[[], object], work: Path, size: int, runtime: int, qd1_count: int
) -> dict[str, float]:
    # os.sync() before each workload: dirty pages of the previous run are written back
    # first instead of throttling whichever writer comes next.
    out: dict[str, float] = {}
    with serve() as (origin, snap):  # type: ignore[attr-defined]
        os.sync()
        out["seq1m"] = seq1m(origin, size)
        if snap:
            os.sync()
            out["snapread"] = snapread(snap, size)
    with serve() as (origin, _):  # type: ignore[attr-defined]
        os.sync()
        out["rand4k"] = rand4k(origin, size, runtime)
    with serve() as (origin, snap):  # type: ignore[attr-defined]
        os.sync()
        out["qd1_512_write"] = qd1_512(origin, qd1_count, True)
        out["qd1_512_read"] = qd1_512(origin, qd1_count, False)
        if snap:
            out["qd1_512_snapread"] = qd1_512(snap, qd1_count, False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256", help="image size in MiB (default 256)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, medians reported")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--qd1-count", type=int, default=20000, help="requests per qd1 run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    size = int(args.size) * MiB
    with tempfile.TemporaryDirectory(prefix="snapimg-bench-") as tmp:
        work = Path(tmp)
        image = work / "disk.raw"
        pattern = (bytes(range(256)) * 4096)[:MiB]
        with image.open("wb") as f:
            for _ in range(size // MiB):
                f.write(pattern)
        configs: dict[str, Callable[[], object]] = {
            "a_snapimg_nosnap": lambda: snapimg_serve(work, image, False),
            "b_snapimg_snap": lambda: snapimg_serve(work, image, True),
            "c_qsd_nofilter": lambda: qsd_serve(work, image, False),
            "d_qsd_cbw": lambda: qsd_serve(work, image, True),
        }
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in configs}
        for _ in range(args.reps):
            for name, serve in configs.items():
                for key, value in measure(serve, work, size, args.runtime, args.qd1_count).items():
                    samples[name].setdefault(key, []).append(value)
    med = {c: {k: statistics.median(v) for k, v in m.items()} for c, m in samples.items()}
    a, b, c, d = (med[k] for k in configs)
    ratios = {
        "seq1m_first_vs_qsd_cbw": b["seq1m"] / d["seq1m"],
        "rand4k_vs_qsd_cbw": b["rand4k"] / d["rand4k"],
        "seq1m_nosnap_vs_qsd": a["seq1m"] / c["seq1m"],
        "rand4k_nosnap_vs_qsd": a["rand4k"] / c["rand4k"],
        "snap_read_vs_qsd": b["snapread"] / d["snapread"],
        "qd1_512_write_vs_qsd": a["qd1_512_write"] / c["qd1_512_write"],
        "qd1_512_read_vs_qsd": a["qd1_512_read"] / c["qd1_512_read"],
        "qd1_512_write_vs_qsd_cbw": b["qd1_512_write"] / d["qd1_512_write"],
        "qd1_512_snapread_vs_qsd_cbw": b["qd1_512_snapread"] / d["qd1_512_snapread"],
    }
    result = {
        "size_mib": size // MiB,
        "reps": args.reps,
        "units": {"seq1m": "MiB/s", "rand4k": "IOPS", "snapread": "MiB/s", "qd1_*": "IOPS"},
        "medians": {k: {m: round(v, 1) for m, v in vals.items()} for k, vals in med.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cols = ["seq1m", "rand4k", "snapread", "qd1_512_write", "qd1_512_read", "qd1_512_snapread"]
        print(f"{'config':<20}" + "".join(f" {c:>16}" for c in cols))
        for name, vals in med.items():
            cells = (f"{vals[c]:.0f}" if c in vals else "-" for c in cols)
            print(f"{name:<20}" + "".join(f" {c:>16}" for c in cells))
        for k, v in ratios.items():
            print(f"{k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
