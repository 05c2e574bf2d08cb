"""Engine throughput beside plain os.pwrite / os.pread on the same kind of file.

Origin writes through the engine with 0, 1 and 8 live snapshots (sequential 1 MiB and
random 4 KiB; first and second overwrite), and sequential snapshot reads.  Each engine
figure is measured right after its plain counterpart on fresh files in ``--dir``;
ratios are engine / plain (or 8 snapshots / 1 snapshot), the median of ``--repeat``
rounds.  Files stay in the page cache (no sync at
the end) unless ``--sync``.  ``assoc_bytes_per_tib`` is the block-association memory a
fully overwritten 1 TiB origin needs at the default block size, measured on a real
index filled for a sparse 1 TiB origin.

    .venv/bin/python bench/engine.py [--size 256M] [--dir /var/tmp] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, bench/ comes first on sys.path, where bench/inspect.py would shadow
# the standard library's inspect module
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from snapimg.engine import Engine  # noqa: E402
from snapimg.engine.index import OriginIndex, pack  # noqa: E402
from snapimg.units import format_size, parse_size  # noqa: E402

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


def timed(fn: Callable[[], int], sync: Callable[[], None] | None = None) -> float:
    """Bytes per second of ``fn`` (which returns the bytes it moved)."""
    t0 = time.perf_counter()
    n = fn()
    if sync:
        sync()
    return n / (time.perf_counter() - t0)


def seq_write(write: Callable[[int, bytes], None], size: int) -> Callable[[], int]:
    buf = os.urandom(MIB)

    def run() -> int:
        for off in range(0, size, MIB):
            write(off, buf)
        return size

    return run


def rand_write(
    write: Callable[[int, bytes], None], offsets: list[int]
) -> Callable[[], int]:
    buf = os.urandom(4096)

    def run() -> int:
        for off in offsets:
            write(off, buf)
        return 4096 * len(offsets)

    return run


def seq_read(read: Callable[[int, int], bytes], size: int) -> Callable[[], int]:
    def run() -> int:
        for off in range(0, size, MIB):
            read(off, MIB)
        return size

    return run


class Round:
    """One round on fresh files: each engine figure is measured right after its plain
    counterpart, so that both see the same machine load."""

    def __init__(self, root: Path, size: int, durability: str, sync: bool) -> None:
        self.root, self.size, self.durability, self.do_sync = root, size, durability, sync
        rnd = random.Random(7)
        # distinct 4 KiB offsets in distinct 64 KiB blocks: every write is a first overwrite
        blocks = rnd.sample(range(size // BS), min(4096, size // BS))
        self.rand_offsets = [b * BS + rnd.randrange(16) * 4096 for b in blocks]
        d = root / "plain"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        make_file(d / "disk.img", size)
        self.plain_fd = os.open(d / "disk.img", os.O_RDWR)

    def close(self) -> None:
        os.close(self.plain_fd)

    def _pw(self, off: int, b: bytes) -> None:
        os.pwrite(self.plain_fd, b, off)

    def _pr(self, off: int, n: int) -> bytes:
        return os.pread(self.plain_fd, n, off)

    def _psync(self) -> None:
        os.fdatasync(self.plain_fd)

    def plain_seq(self) -> float:
        return timed(seq_write(self._pw, self.size), self._psync if self.do_sync else None)

    def plain_rand(self) -> float:
        return timed(rand_write(self._pw, self.rand_offsets), self._psync if self.do_sync else None)

    def plain_read(self) -> float:
        return timed(seq_read(self._pr, self.size))

    def engine(self, nsnaps: int) -> dict[str, float]:
        """Figures of an engine with ``nsnaps`` live snapshots, each beside plain."""
        d = self.root / f"engine{nsnaps}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        make_file(d / "disk.img", self.size)
        durability: Any = self.durability
        eng = Engine.open(d / "store", {"disk": d / "disk.img"}, durability=durability)
        try:
            dev = eng.origin_device("disk")
            for i in range(nsnaps):
                eng.create_snapshot("disk", f"s{i}")
            sync = dev.flush if self.do_sync else None
            out = {"plain_seq1m": self.plain_seq()}
            out["seq1m_first"] = timed(seq_write(dev.pwrite, self.size), sync)
            out["plain_seq1m_2"] = self.plain_seq()
            out["seq1m_second"] = timed(seq_write(dev.pwrite, self.size), sync)
            if nsnaps:
                snap = eng.snapshot_device("disk", "s0")
                out["plain_read1m"] = self.plain_read()
                out["read1m"] = timed(seq_read(snap.pread, self.size))
                eng.create_snapshot("disk", "r")  # a new snapshot: random writes copy again
                out["plain_rand4k"] = self.plain_rand()
                out["rand4k_first"] = timed(rand_write(dev.pwrite, self.rand_offsets), sync)
            return out
        finally:
            eng.close()
            shutil.rmtree(d, ignore_errors=True)


def ratios(r: dict[int, dict[str, float]]) -> dict[str, float]:
    """The issue's ratios from one round's figures (by number of snapshots)."""
    one, eight, zero = r[1], r[8], r[0]
    return {
        "seq1m_nosnap_ratio": zero["seq1m_first"] / zero["plain_seq1m"],
        "seq1m_first_ratio": one["seq1m_first"] / one["plain_seq1m"],
        "seq1m_second_ratio": one["seq1m_second"] / one["plain_seq1m_2"],
        "rand4k_first_ratio": one["rand4k_first"] / one["plain_rand4k"],
        "snap8_vs_snap1_ratio": (eight["seq1m_first"] / eight["plain_seq1m"])
        / (one["seq1m_first"] / one["plain_seq1m"]),
        "snap_read_ratio": one["read1m"] / one["plain_read1m"],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="128M", help="origin size (default 128M)")
    ap.add_argument("--dir", default=None, help="where the files go (default: a tmp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--sync", action="store_true", help="fdatasync at the end of each phase")
    ap.add_argument("--no-strict", action="store_true", help="skip the strict-mode figures")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    size = max(MIB, parse_size(args.size) // MIB * MIB)
    root = Path(tempfile.mkdtemp(prefix="snapimg-bench-", dir=args.dir))
    res: dict[str, Any] = {"size": size, "block_size": BS, "repeat": args.repeat}
    try:
        for mode in ["default"] if args.no_strict else ["default", "strict"]:
            pre = "" if mode == "default" else "strict_"
            per_round: list[dict[str, float]] = []
            rates: dict[str, list[float]] = {}
            for _ in range(args.repeat):
                rnd = Round(root, size, mode, args.sync)
                try:
                    figs = {n: rnd.engine(n) for n in (0, 1, 8)}
                finally:
                    rnd.close()
                per_round.append(ratios(figs))
                for n, f in figs.items():
                    for k, v in f.items():
                        rates.setdefault(f"snap{n}_{k}", []).append(v)
            for key in per_round[0]:
                res[pre + key] = round(statistics.median(r[key] for r in per_round), 3)
            for key, vals in sorted(rates.items()):
                res[f"{pre}{key}_mib_s"] = round(statistics.median(vals) / MIB, 1)
        res["assoc_bytes_per_tib"] = assoc_bytes_per_tib()
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
