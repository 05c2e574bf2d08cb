#!/usr/bin/env python3
"""How fast QEMU alone writes a backup's output, with no snapimg in the path.

    .venv/bin/python bench/backup_writer.py [--size 4G] [--data 1G] [--extent 4M]
                                            [--runs 3] [--dir D] [--json]

The image of ``bench/backup.py`` (``--data`` bytes in ``--extent`` runs spread evenly) is
exported read-only by ``qemu-nbd``; ``nbdcopy --destination-is-zero`` copies it into a raw
file (the reference of ``full_vs_nbdcopy``) and into new images exported writable by
``qemu-storage-daemon``, one row per writer configuration: raw, qcow2 (64 KiB clusters, as a
backup writes), qcow2 with ``aio=io_uring``, qcow2 with 2 MiB clusters.  Each copy is timed
up to the daemon's exit and an fsync of the output; every run of every row in one
invocation, medians reported.  A backup's full copy cannot be faster than its writer: this
bounds ``full_vs_nbdcopy`` (issue 11) from above while QEMU writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup import fsync_path, make_image, qemu_nbd, timed  # noqa: E402

from snapimg.units import parse_size  # noqa: E402

# label -> (format, qemu-img create options, extra "file" node options)
WRITERS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "qsd_raw": ("raw", [], {}),
    "qsd_qcow2": ("qcow2", [], {}),
    "qsd_qcow2_io_uring": ("qcow2", [], {"aio": "io_uring"}),
    "qsd_qcow2_2m_clusters": ("qcow2", ["-o", "cluster_size=2M"], {}),
}


def qsd_copy(src: str, out: Path, size: int, fmt: str, create: list[str],
             file_opts: dict[str, Any]) -> float:  # fmt: skip
    """nbdcopy ``src`` into a new ``fmt`` image exported by qemu-storage-daemon."""
    out.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *create, str(out), str(size)],
                   check=True)  # fmt: skip
    sock, pidfile = out.with_suffix(".sock"), out.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    node = {"driver": fmt, "node-name": "img",
            "file": {"driver": "file", "filename": str(out), **file_opts}}  # fmt: skip
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", json.dumps(node),
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=img,name=x,writable=on",
         "--pidfile", str(pidfile)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: qemu-storage-daemon did not start")
            time.sleep(0.01)
        t0 = time.monotonic()
        dst = f"nbd+unix:///x?socket={sock}"
        subprocess.run(["nbdcopy", "--destination-is-zero", src, dst], check=True)
        proc.terminate()
        proc.wait(60)
        fsync_path(out)
        return time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="1G")
    ap.add_argument("--extent", default="4M")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory parent (TMPDIR)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size, data, extent = (parse_size(v) for v in (args.size, args.data, args.extent))
    times: dict[str, list[float]] = {"nbdcopy_raw_file": [], **{k: [] for k in WRITERS}}
    with tempfile.TemporaryDirectory(prefix="bench-writer-", dir=args.dir) as d:
        work = Path(d)
        image = work / "src.img"
        make_image(image, size, data, extent, seed=1)
        with qemu_nbd(image, "raw", read_only=True, persistent=True) as src:
            for _ in range(args.runs):
                out = work / "out.raw"
                out.unlink(missing_ok=True)
                t, _ = timed(["nbdcopy", "--destination-is-zero", src, str(out)], out)
                times["nbdcopy_raw_file"].append(t)
                for label, (fmt, create, opts) in WRITERS.items():
                    times[label].append(qsd_copy(src, work / f"{label}.img", size, fmt,
                                                 create, opts))  # fmt: skip
                    (work / f"{label}.img").unlink()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    ref = med["nbdcopy_raw_file"]
    result = {
        "size": size, "data": data, "extent": extent, "runs": args.runs,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": med,
        "vs_nbdcopy_raw_file": {k: round(ref / v, 3) for k, v in med.items() if k in WRITERS},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in med.items():
            print(f"{k:24} {v:7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
