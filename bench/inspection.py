#!/usr/bin/env python3
"""Benchmark `snapimg checksum` and `snapimg diff` on a sparse image against coreutils.

Image A: SIZE bytes (default 4 GiB), DATA bytes of random data (default 1 GiB) in 16 runs
spread over it, the rest holes.  B: a sparse copy of A with the last data byte changed (so
cmp must read everything before it finds the difference).  dataA / dataB: the DATA bytes
alone, as plain files.  Everything is in the page cache (warm runs; best of --reps).

  checksum:  snapimg checksum A        vs  sha256sum dataA  (the issue's baseline)
                                       and sha256sum A      (the same digest, whole image)
  diff:      snapimg diff A B          vs  cmp dataA dataB  (the issue's baseline)
                                       and cmp A B          (whole images)

"ratio" = baseline seconds / snapimg seconds (>= 1: snapimg is faster).  Times are wall
clock of the commands as a user runs them (including Python start-up); their CPU seconds
(user+sys) are reported too, as the fairer number on a shared, loaded machine.
Usage: bench/inspection.py [--size 4G] [--data 1G] [--reps 3] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
RUNS = 16
SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_images(work: Path, size: int, data: int) -> dict[str, Path]:
    a, b, da, db = (work / n for n in ("a.img", "b.img", "dataA.bin", "dataB.bin"))
    run_len = data // RUNS
    stride = size // RUNS
    chunk = os.urandom(run_len)
    with open(a, "wb") as fa, open(da, "wb") as fd:
        fa.truncate(size)
        for i in range(RUNS):
            piece = i.to_bytes(8, "little") + chunk[8:]  # runs differ from each other
            fa.seek(i * stride + stride // 2)
            fa.write(piece)
            fd.write(piece)
    last = (RUNS - 1) * stride + stride // 2 + run_len - 1
    subprocess.run(["cp", "--sparse=always", str(a), str(b)], check=True)
    shutil.copyfile(da, db)
    for path, off in ((b, last), (db, data - 1)):
        with open(path, "r+b") as f:
            f.seek(off)
            old = f.read(1)
            f.seek(off)
            f.write(bytes([old[0] ^ 0xFF]))
    for p in (a, b, da, db):  # warm the page cache
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    return {"a": a, "b": b, "dataA": da, "dataB": db}


CPU: dict[str, float] = {}  # best run's user+sys seconds, by command line


def best(cmd: list[str], reps: int, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Best wall time of ``reps`` runs (its CPU seconds go to CPU), and the output."""
    runs, out = [], ""
    for _ in range(reps):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        runs.append((wall, cpu))
        if proc.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        out = proc.stdout
    wall, cpu = min(runs)
    CPU[" ".join(cmd)] = round(cpu, 3)
    return wall, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-inspect-", dir=args.workdir))
    try:
        img = make_images(work, size, data)
        s = {k: str(v) for k, v in img.items()}
        t_ck, out_ck = best([*SNAPIMG, "checksum", s["a"]], args.reps)
        t_sha_data, _ = best(["sha256sum", s["dataA"]], args.reps)
        t_sha_img, out_sha = best(["sha256sum", s["a"]], args.reps)
        if out_ck.split()[0] != out_sha.split()[0]:
            raise SystemExit("snapimg checksum and sha256sum disagree")
        t_diff, _ = best([*SNAPIMG, "diff", s["a"], s["b"]], args.reps, ok=(1,))
        t_cmp_data, _ = best(["cmp", s["dataA"], s["dataB"]], args.reps, ok=(1,))
        t_cmp_img, _ = best(["cmp", s["a"], s["b"]], args.reps, ok=(1,))
        t_start, _ = best([*SNAPIMG, "--version"], args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    result = {
        "load_average_1min": round(load, 2),
        "cpu_seconds": {k.replace(str(work) + "/", ""): v for k, v in CPU.items()},
        "image_size": size,
        "data_bytes": data,
        "reps": args.reps,
        "python_startup_s": round(t_start, 3),
        "checksum": {
            "snapimg_s": round(t_ck, 3),
            "sha256sum_data_s": round(t_sha_data, 3),
            "sha256sum_image_s": round(t_sha_img, 3),
            "ratio_vs_data": round(t_sha_data / t_ck, 3),
            "ratio_vs_image": round(t_sha_img / t_ck, 3),
            "data_mib_s": round(data / MiB / t_ck, 1),
        },
        "diff": {
            "snapimg_s": round(t_diff, 3),
            "cmp_data_s": round(t_cmp_data, 3),
            "cmp_image_s": round(t_cmp_img, 3),
            "ratio_vs_data": round(t_cmp_data / t_diff, 3),
            "ratio_vs_image": round(t_cmp_img / t_diff, 3),
            "data_mib_s": round(2 * data / MiB / t_diff, 1),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("checksum", "diff"):
            r = result[name]
            assert isinstance(r, dict)
            print(f"{name:9} " + "  ".join(f"{k}={v}" for k, v in r.items()))
        print(f"python start-up {result['python_startup_s']} s (included in snapimg times)")
        print(f"cpu seconds {result['cpu_seconds']}; load average {result['load_average_1min']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
