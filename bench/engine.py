"""Engine throughput beside plain os.pwrite / os.pread on the same kind of file.

Origin writes through the engine with 0, 1 and 8 live snapshots (sequential 1 MiB and
random 4 KiB; first and second overwrite), and sequential snapshot reads.  Each round
makes fresh, fully written files in ``--dir`` for plain I/O and for each engine, and
in every phase plain and the engines take turns request by request, so all see the
same machine load.  A rate is bytes over the summed request times without each
contender's slowest 5% of requests (on a shared machine those are the scheduler's
preemptions, not I/O).  Ratios are engine / plain (or 8 snapshots / 1 snapshot), the
median of ``--repeat`` rounds.  Data stays in the page cache (no sync
in the timed phases; strict mode syncs the store before origin writes by design).
``assoc_bytes_per_tib`` is the block-association memory a fully overwritten 1 TiB
origin needs at the default block size, measured on a real index filled for a sparse
1 TiB origin.

``--datapath`` picks the engines' data path (compiled, the default, or python).
``reflink`` says whether the engines' copies were clones (FICLONERANGE: origin and
store on one XFS or btrfs), from the compiled data path's counters, summed over all
rounds in ``copies``.  ``fragmentation``: the cost reflinks move to the origin.  A
fresh origin with one snapshot takes ``FRAG_WRITES`` random 4 KiB first overwrites,
flushed every ``FRAG_FLUSH`` writes (as writeback would), and its extents are counted
(FIEMAP, as ``filefrag``; null where the file system has none) before and after:
every cloned block that is then overwritten in part splits the origin's extents.

    .venv/bin/python bench/engine.py [--size 128M] [--repeat 3] [--dir /var/tmp]
                                     [--datapath compiled|python] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapimg.engine import Engine
from snapimg.engine.compiled import CompiledDataPath
from snapimg.engine.index import OriginIndex, pack
from snapimg.engine.reflink import file_extents
from snapimg.units import format_size, parse_size

MIB = 1 << 20
BS = 65536


def make_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes, fully written (allocated, like a used disk image)."""
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


TRIM = 0.05  # the slowest 5% of each contender's requests are dropped (see module doc)

Writer = Callable[[int, bytes], None]
Reader = Callable[[int, int], bytes]


def interleaved(jobs: dict[str, Callable[[int], int]], steps: int) -> dict[str, float]:
    """Run ``jobs[name](step)`` for every step, the contenders taking turns request by
    request (so all see the same machine load); bytes per second of each, from the
    trimmed sum of its request times."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    moved = dict.fromkeys(jobs, 0)
    clock = time.perf_counter
    order = list(jobs.items())
    for step in range(steps):
        k = step % len(order)  # rotate who goes first: costs deferred by one request
        for name, job in order[k:] + order[:k]:  # (e.g. dirty throttling) spread evenly
            t0 = clock()
            moved[name] += job(step)
            times[name].append(clock() - t0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        keep = ts[: max(1, len(ts) - int(len(ts) * TRIM))]
        out[name] = moved[name] * len(keep) / len(ts) / sum(keep)
    return out


def seq_writer(write: Writer, buf: bytes) -> Callable[[int], int]:
    def job(step: int) -> int:
        write(step * MIB, buf)
        return MIB

    return job


def seq_reader(read: Reader) -> Callable[[int], int]:
    def job(step: int) -> int:
        read(step * MIB, MIB)
        return MIB

    return job


def rand_writer(write: Writer, offsets: list[int], buf: bytes) -> Callable[[int], int]:
    def job(step: int) -> int:
        write(offsets[step], buf)
        return 4096

    return job


def extent_count(path: Path) -> int | None:
    """How many extents the file has (None: the file system does not say)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return len(file_extents(fd))
    except OSError:
        return None
    finally:
        os.close(fd)


def add_copies(copies: dict[str, int], eng: Engine) -> None:
    """Add the engine's copy counters (compiled data path) to ``copies``."""
    if isinstance(eng.dp, CompiledDataPath):
        for k, v in eng.dp.copy_stats().items():
            copies[k] = copies.get(k, 0) + v


FRAG_WRITES = 2048
FRAG_FLUSH = 64


def fragmentation(root: Path, size: int, datapath: str) -> dict[str, Any]:
    """Extents of an origin before and after random first overwrites under a snapshot."""
    d = root / "frag"
    d.mkdir()
    make_file(d / "disk.img", size)
    made = extent_count(d / "disk.img")
    copies: dict[str, int] = {}
    rnd = random.Random(11)
    blocks = rnd.sample(range(size // BS), min(FRAG_WRITES, size // BS))
    small = os.urandom(4096)
    with Engine.open(d / "store", {"disk": d / "disk.img"}, datapath=datapath) as eng:
        eng.create_snapshot("disk", "s")
        dev = eng.origin_device("disk")
        for i, b in enumerate(blocks):
            dev.pwrite(b * BS + rnd.randrange(16) * 4096, small)
            if i % FRAG_FLUSH == FRAG_FLUSH - 1:
                eng.flush()
        add_copies(copies, eng)
    after = extent_count(d / "disk.img")
    shutil.rmtree(d)
    return {"writes": len(blocks), "made": made, "after": after, "copies": copies}


def one_round(
    root: Path, size: int, durability: Any, datapath: str, copies: dict[str, int]
) -> dict[str, float]:
    """Fresh files for plain I/O and for engines with 0, 1 and 8 snapshots; every phase
    interleaves them.  Returns rates (bytes/s) by "<contender>_<phase>"."""
    for d in root.iterdir():
        shutil.rmtree(d, ignore_errors=True)
    names = ["plain", "snap0", "snap1", "snap8"]
    for name in names:
        (root / name).mkdir()
        make_file(root / name / "disk.img", size)
    plain_fd = os.open(root / "plain" / "disk.img", os.O_RDWR)
    engines = {
        n: Engine.open(
            root / n / "store",
            {"disk": root / n / "disk.img"},
            durability=durability,
            datapath=datapath,
        )
        for n in names[1:]
    }
    try:
        for n, eng in engines.items():
            for i in range(int(n[4:])):
                eng.create_snapshot("disk", f"s{i}")
        writers: dict[str, Writer] = {"plain": lambda off, b: os.pwrite(plain_fd, b, off)}  # type: ignore[dict-item]
        for n, eng in engines.items():
            writers[n] = eng.origin_device("disk").pwrite
        buf = os.urandom(MIB)
        steps = size // MIB
        out: dict[str, float] = {}
        for phase in ("seq1m_first", "seq1m_second"):
            rates = interleaved({n: seq_writer(w, buf) for n, w in writers.items()}, steps)
            out.update({f"{n}_{phase}": r for n, r in rates.items()})
        readers: dict[str, Reader] = {
            "plain": lambda off, n: os.pread(plain_fd, n, off),
            "snap1": engines["snap1"].snapshot_device("disk", "s0").pread,
            "snap8": engines["snap8"].snapshot_device("disk", "s0").pread,
        }
        rates = interleaved({n: seq_reader(r) for n, r in readers.items()}, steps)
        out.update({f"{n}_read1m": r for n, r in rates.items()})
        # distinct 4 KiB offsets in distinct blocks, after a new snapshot: first overwrites
        rnd = random.Random(7)
        blocks = rnd.sample(range(size // BS), min(4096, size // BS))
        offsets = [b * BS + rnd.randrange(16) * 4096 for b in blocks]
        for n in ("snap1", "snap8"):
            engines[n].create_snapshot("disk", "r")
        small = os.urandom(4096)
        jobs = {n: rand_writer(writers[n], offsets, small) for n in ("plain", "snap1", "snap8")}
        rates = interleaved(jobs, len(offsets))
        out.update({f"{n}_rand4k_first": r for n, r in rates.items()})
        return out
    finally:
        os.close(plain_fd)
        for eng in engines.values():
            add_copies(copies, eng)
            eng.close()


def ratios(r: dict[str, float]) -> dict[str, float]:
    """The issue's ratios from one round's rates."""
    return {
        "seq1m_nosnap_ratio": r["snap0_seq1m_first"] / r["plain_seq1m_first"],
        "seq1m_first_ratio": r["snap1_seq1m_first"] / r["plain_seq1m_first"],
        "seq1m_second_ratio": r["snap1_seq1m_second"] / r["plain_seq1m_second"],
        "rand4k_first_ratio": r["snap1_rand4k_first"] / r["plain_rand4k_first"],
        "snap8_vs_snap1_ratio": r["snap8_seq1m_first"] / r["snap1_seq1m_first"],
        "snap8_seq1m_first_ratio": r["snap8_seq1m_first"] / r["plain_seq1m_first"],
        "snap_read_ratio": r["snap1_read1m"] / r["plain_read1m"],
    }


def assoc_bytes_per_tib() -> int:
    """Memory of the block association of a fully overwritten sparse 1 TiB origin."""
    nblocks = (1 << 40) // BS
    tracemalloc.start()
    idx = OriginIndex(nblocks)
    base = tracemalloc.get_traced_memory()[0]
    table = idx.table
    for b in range(0, nblocks, 4096):  # one entry per block, chunk by chunk
        table.set(b, pack(1, b))
        chunk = table.chunks[b >> 12]
        for i in range(1, 4096):
            chunk[i] = pack(1, b + i)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used


def create_on_1tib_ms(root: Path, datapath: str) -> float:
    """Milliseconds to create a snapshot of a sparse 1 TiB origin (file store)."""
    d = root / "tib"
    d.mkdir()
    with open(d / "disk.img", "wb") as f:
        f.truncate(1 << 40)
    with Engine.open(d / "store", {"disk": d / "disk.img"}, datapath=datapath) as eng:
        t0 = time.perf_counter()
        eng.create_snapshot("disk", "s")
        took = time.perf_counter() - t0
        eng.origin_device("disk").pwrite((1 << 40) - 4096, b"x" * 4096)  # a far block
    shutil.rmtree(d)
    return took * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="128M", help="origin size (default 128M)")
    ap.add_argument("--dir", default=None, help="where the files go (default: a tmp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--no-strict", action="store_true", help="skip the strict-mode figures")
    ap.add_argument(
        "--datapath",
        choices=["compiled", "python"],
        default="compiled",
        help="the engines' data path (default: compiled)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    size = max(MIB, parse_size(args.size) // MIB * MIB)
    root = Path(tempfile.mkdtemp(prefix="snapimg-bench-", dir=args.dir))
    res: dict[str, Any] = {
        "size": size,
        "block_size": BS,
        "repeat": args.repeat,
        "datapath": args.datapath,
        "dir": str(Path(args.dir or tempfile.gettempdir()).resolve()),
    }
    copies: dict[str, int] = {}
    try:
        for mode in ["default"] if args.no_strict else ["default", "strict"]:
            pre = "" if mode == "default" else "strict_"
            rounds = [
                one_round(root, size, mode, args.datapath, copies) for _ in range(args.repeat)
            ]
            per_round = [ratios(r) for r in rounds]
            for key in per_round[0]:
                res[pre + key] = round(statistics.median(r[key] for r in per_round), 3)
            for key in sorted(rounds[0]):
                med = statistics.median(r[key] for r in rounds)
                res[f"{pre}{key}_mib_s"] = round(med / MIB, 1)
        for d in root.iterdir():
            shutil.rmtree(d)
        res["reflink"] = copies.get("clone_runs", 0) > 0
        res["copies"] = copies
        res["fragmentation"] = fragmentation(root, size, args.datapath)
        res["assoc_bytes_per_tib"] = assoc_bytes_per_tib()
        res["create_snapshot_1tib_ms"] = round(create_on_1tib_ms(root, args.datapath), 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for k, v in res.items():
            extra = f"  ({format_size(v)})" if k == "assoc_bytes_per_tib" else ""
            print(f"{k:40} {v}{extra}")


if __name__ == "__main__":
    main()
