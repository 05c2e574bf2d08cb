#!/usr/bin/env python3
"""Benchmark `snapimg serve` against C NBD servers and QEMU's copy-before-write.

Servers, each started on a fresh copy of the same raw file (filled with data, so every
copy-before-write copy is real), over a unix socket:
  file            the raw file itself, no server (fio io_uring, page cache): the ceiling
  nbdkit          nbdkit's file plugin (C)
  qemu_nbd        qemu-nbd (cache=writeback, aio=threads)
  qsd             qemu-storage-daemon NBD export, no filter
  qsd_cbw         qemu-storage-daemon copy-before-write + snapshot-access, live snapshot
  snapimg         snapimg serve, compiled data path (SNAPIMG_DATAPATH=compiled), no snapshot
  snapimg_snap    the same with one live snapshot
  python          snapimg serve, Python data path (the reference), no snapshot
  python_snap     the same with one live snapshot
Workloads (each on a freshly started server, so "first touch" means it):
  rand4k_qd16     fio 4 KiB random writes, queue depth 16, IOPS
  rand4k_qd1      fio 4 KiB random writes, queue depth 1, IOPS
  rand4k_2c_qd1   two fio clients (two connections) at queue depth 1 each, total IOPS
  rand4k_2c_qd16  two fio clients at queue depth 16 each, total IOPS
  seq1m           1 MiB sequential writes over the whole image (qemu-img bench -d 16),
                  MiB/s: with a snapshot every block is a first touch
  snapread        sequential read of the snapshot after seq1m rewrote everything
                  (nbdcopy --no-extents SNAPSHOT null:), MiB/s
  qd1_512_write / qd1_512_read / qd1_512_snapread
                  512 B sequential requests at queue depth 1 (qemu-img bench -d 1 -s 512
                  -t none), requests/s: what a BIOS or DOS guest's IDE disk pays
Usage: bench/serve.py [--size 256] [--reps 3] [--runtime 5] [--only NAME,...] [--json]
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
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/listening.py: waiting for a server to listen

from tests.listening import wait_listening  # noqa: E402

Uris = tuple[str, str]  # origin URI (or file path for "file"), snapshot URI ("" if none)


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


def wait_socket(proc: subprocess.Popen[str], sock: Path, what: str) -> None:
    """Wait until ``sock`` accepts a connection (the file appears at bind, before listen)."""
    try:
        wait_listening(sock, proc, what)
    except AssertionError as err:
        raise SystemExit(f"bench: {err}") from None


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def snapimg_serve(
    work: Path, image: Path, snapshot: bool, datapath: str = "compiled"
) -> Iterator[Uris]:
    sock, ctl, store = work / "nbd.sock", work / "ctl.sock", work / "store"
    shutil.rmtree(store, ignore_errors=True)
    env = dict(os.environ, SNAPIMG_DATAPATH=datapath)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapimg.cli.main", "serve", f"disk={image}", "--socket",
         str(sock), "--control", str(ctl), "--store-dir", str(store)],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        line = wait_line(proc, 60)
        if f"datapath={datapath}" not in line:
            raise SystemExit(f"snapimg serve did not use the {datapath} data path: {line}")
        if snapshot:
            run(sys.executable, "-m", "snapimg.cli.main", "snapshot", "create", "--control",
                str(ctl), "disk@bench")  # fmt: skip
        snap = f"nbd+unix:///disk@bench?socket={sock}" if snapshot else ""
        yield f"nbd+unix:///disk?socket={sock}", snap
    finally:
        stop(proc)
        shutil.rmtree(store, ignore_errors=True)


@contextmanager
def qsd_serve(work: Path, image: Path, cbw: bool) -> Iterator[Uris]:
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
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0",
             "--export", f"type=nbd,id=e0,node-name={top},name=disk,writable=on"]  # fmt: skip
    if cbw:
        args += ["--export", "type=nbd,id=e1,node-name=snap,name=disk@bench"]
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_socket(proc, sock, "qemu-storage-daemon")
        snap = f"nbd+unix:///disk@bench?socket={sock}" if cbw else ""
        yield f"nbd+unix:///disk?socket={sock}", snap
    finally:
        stop(proc)
        target.unlink(missing_ok=True)


@contextmanager
def nbd_server(sock: Path, *cmd: str) -> Iterator[Uris]:
    """A C NBD server (nbdkit, qemu-nbd) exporting ``disk`` on the unix socket ``sock``."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_socket(proc, sock, cmd[0])
        yield f"nbd+unix:///disk?socket={sock}", ""
    finally:
        stop(proc)


def nbdkit_serve(work: Path, image: Path) -> AbstractContextManager[Uris]:
    sock = work / "nbdkit.sock"
    return nbd_server(sock, "nbdkit", "--foreground", "--unix", str(sock), "--exportname",
                      "disk", "file", str(image))  # fmt: skip


def qemu_nbd_serve(work: Path, image: Path) -> AbstractContextManager[Uris]:
    sock = work / "qemu-nbd.sock"
    return nbd_server(sock, "qemu-nbd", "--format=raw", "--cache=writeback", "--aio=threads",
                      "--shared=4", "--persistent", "--export-name=disk", f"--socket={sock}",
                      str(image))  # fmt: skip


@contextmanager
def plain_file(work: Path, image: Path) -> Iterator[Uris]:
    yield str(image), ""


# -- workloads --------------------------------------------------------------------------


def fio(target: str, size: int, runtime: int, rw: str, bs: str, depth: int, jobs: int = 1) -> float:
    """Total IOPS of fio on an NBD URI (or, for a path, the file itself with io_uring)."""
    engine = ["--ioengine=nbd", f"--uri={target}"] if "://" in target else [
        "--ioengine=io_uring", f"--filename={target}"]  # fmt: skip
    out = run("fio", "--name=bench", *engine, f"--rw={rw}", f"--bs={bs}",
              f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting",
              f"--size={size}", f"--runtime={runtime}", "--time_based", "--randrepeat=1",
              "--output-format=json")  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["write"]["iops"] if "write" in rw else job["read"]["iops"])


def rand4k(uri: str, size: int, runtime: int) -> float:
    """IOPS of 4 KiB random writes at queue depth 16 (one client)."""
    return fio(uri, size, runtime, "randwrite", "4k", 16)


def bench_seconds(out: str) -> float:
    match = re.search(r"Run completed in ([\d.]+) seconds", out)
    if match is None:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    return float(match.group(1))


def seq1m(target: str, size: int) -> float:
    """MiB/s of 1 MiB sequential writes over the whole export, once."""
    count = size // MiB
    fmt = ["-f", "raw"]
    out = run("qemu-img", "bench", "-w", *fmt, "-s", "1M", "-d", "16", "-c", str(count),
              target)  # fmt: skip
    return count / bench_seconds(out)


def qd1_512(target: str, count: int, write: bool) -> float:
    """Requests/s of 512 B sequential requests at queue depth 1."""
    args = ["-w"] if write else []
    out = run("qemu-img", "bench", *args, "-f", "raw", "-t", "none", "-s", "512", "-d", "1",
              "-c", str(count), target)  # fmt: skip
    return count / bench_seconds(out)


def snapread(uri: str, size: int) -> float:
    t0 = time.monotonic()
    run("nbdcopy", "--no-extents", uri, "null:")
    return size / MiB / (time.monotonic() - t0)


Server = Callable[[Path], AbstractContextManager[Uris]]


def measure(
    serve: Server, image: Path, base: Path, size: int, runtime: int, qd1_count: int
) -> dict[str, float]:
    """Every workload on a fresh copy of ``base`` and a freshly started server.
    os.sync() before each: dirty pages of the previous run are written back first
    instead of throttling whichever writer comes next."""

    def fresh() -> AbstractContextManager[Uris]:
        shutil.copyfile(base, image)
        os.sync()
        return serve(image)

    out: dict[str, float] = {}
    for key, rw, depth, jobs in (
        ("rand4k_qd16", "randwrite", 16, 1),
        ("rand4k_qd1", "randwrite", 1, 1),
        ("rand4k_2c_qd1", "randwrite", 1, 2),
        ("rand4k_2c_qd16", "randwrite", 16, 2),
    ):
        with fresh() as (origin, _):
            out[key] = fio(origin, size, runtime, rw, "4k", depth, jobs)
    with fresh() as (origin, snap):
        out["seq1m"] = seq1m(origin, size)
        if snap:
            os.sync()
            out["snapread"] = snapread(snap, size)
    with fresh() as (origin, snap):
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
    ap.add_argument("--only", help="comma-separated server names (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    size = int(args.size) * MiB
    with tempfile.TemporaryDirectory(prefix="snapimg-bench-") as tmp:
        work = Path(tmp)
        base, image = work / "base.raw", work / "disk.raw"
        pattern = (bytes(range(256)) * 4096)[:MiB]
        with base.open("wb") as f:
            for _ in range(size // MiB):
                f.write(pattern)
        servers: dict[str, Server] = {
            "file": lambda img: plain_file(work, img),
            "nbdkit": lambda img: nbdkit_serve(work, img),
            "qemu_nbd": lambda img: qemu_nbd_serve(work, img),
            "qsd": lambda img: qsd_serve(work, img, False),
            "qsd_cbw": lambda img: qsd_serve(work, img, True),
            "snapimg": lambda img: snapimg_serve(work, img, False),
            "snapimg_snap": lambda img: snapimg_serve(work, img, True),
            "python": lambda img: snapimg_serve(work, img, False, "python"),
            "python_snap": lambda img: snapimg_serve(work, img, True, "python"),
        }
        if args.only:
            unknown = sorted(set(args.only.split(",")) - set(servers))
            if unknown:
                raise SystemExit(f"bench: unknown --only {','.join(unknown)}: "
                                 f"expected some of {','.join(servers)}")  # fmt: skip
            servers = {k: v for k, v in servers.items() if k in args.only.split(",")}
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
        for _ in range(args.reps):
            for name, serve in servers.items():
                got = measure(serve, image, base, size, args.runtime, args.qd1_count)
                for key, value in got.items():
                    samples[name].setdefault(key, []).append(value)
    med = {s: {k: statistics.median(v) for k, v in m.items()} for s, m in samples.items()}

    def ratio(a: str, ka: str, b: str, kb: str) -> float | None:
        if a in med and b in med and ka in med[a] and kb in med[b]:
            return round(med[a][ka] / med[b][kb], 3)
        return None

    ratios = {
        "rand4k_qd16_nosnap_vs_qemu_nbd": ratio(
            "snapimg", "rand4k_qd16", "qemu_nbd", "rand4k_qd16"
        ),
        "rand4k_qd16_nosnap_vs_nbdkit": ratio("snapimg", "rand4k_qd16", "nbdkit", "rand4k_qd16"),
        "rand4k_vs_qsd_cbw": ratio("snapimg_snap", "rand4k_qd16", "qsd_cbw", "rand4k_qd16"),
        "rand4k_qd1_nosnap_vs_qemu_nbd": ratio("snapimg", "rand4k_qd1", "qemu_nbd", "rand4k_qd1"),
        "seq1m_nosnap_vs_nbdkit": ratio("snapimg", "seq1m", "nbdkit", "seq1m"),
        "seq1m_first_vs_qsd_cbw": ratio("snapimg_snap", "seq1m", "qsd_cbw", "seq1m"),
        "snap_read_vs_qsd": ratio("snapimg_snap", "snapread", "qsd_cbw", "snapread"),
        "rand4k_2clients_vs_1": ratio("snapimg", "rand4k_2c_qd1", "snapimg", "rand4k_qd1"),
        "rand4k_2clients_qd16_vs_1": ratio("snapimg", "rand4k_2c_qd16", "snapimg", "rand4k_qd16"),
        "nbdkit_2clients_vs_1": ratio("nbdkit", "rand4k_2c_qd1", "nbdkit", "rand4k_qd1"),
        "qd1_512_write_vs_qsd": ratio("snapimg", "qd1_512_write", "qsd", "qd1_512_write"),
        "qd1_512_read_vs_qsd": ratio("snapimg", "qd1_512_read", "qsd", "qd1_512_read"),
        "rand4k_qd16_compiled_vs_python": ratio("snapimg", "rand4k_qd16", "python", "rand4k_qd16"),
        "rand4k_snap_compiled_vs_python": ratio(
            "snapimg_snap", "rand4k_qd16", "python_snap", "rand4k_qd16"
        ),
        "seq1m_first_compiled_vs_python": ratio("snapimg_snap", "seq1m", "python_snap", "seq1m"),
    }
    result = {
        "size_mib": size // MiB,
        "reps": args.reps,
        "runtime_s": args.runtime,
        "load_avg_at_end": os.getloadavg()[0],
        "units": {"rand4k_*": "IOPS", "seq1m": "MiB/s", "snapread": "MiB/s", "qd1_*": "IOPS"},
        "medians": {k: {m: round(v, 1) for m, v in vals.items()} for k, vals in med.items()},
        **{k: v for k, v in ratios.items() if v is not None},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cols = ["rand4k_qd16", "rand4k_qd1", "rand4k_2c_qd1", "rand4k_2c_qd16", "seq1m",
                "snapread", "qd1_512_write", "qd1_512_read", "qd1_512_snapread"]  # fmt: skip
        print(f"{'server':<14}" + "".join(f" {c[:14]:>14}" for c in cols))
        for name, vals in med.items():
            cells = (f"{vals[c]:.0f}" if c in vals else "-" for c in cols)
            print(f"{name:<14}" + "".join(f" {c:>14}" for c in cells))
        for k, v in ratios.items():
            if v is not None:
                print(f"{k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
