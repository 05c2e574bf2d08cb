"""The main job: a point-in-time snapshot of an image that a client keeps writing.

1. Make a sample raw image with known content.
2. Start ``snapimg serve`` on it (native backend, a store in a temp dir).
3. A qemu-io process writes through NBD, one acknowledged write after another, each with
   its own pattern, while the demo takes a snapshot with ``snapimg snapshot create``.
4. The writer keeps overwriting (blocks from before the snapshot included) while
   ``qemu-img convert`` copies the snapshot over NBD.
5. The copy is compared with the image as it was at snapshot time: the sample content with
   exactly the writes acknowledged before ``create`` returned replayed onto it (plus,
   at most, the single write that was in flight while it ran).

Everything goes through the CLI and NBD, as a user would do it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from snapimg.errors import SnapimgError
from snapimg.units import count

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
WRITE_SIZE = 256 * 1024
SLOTS = IMAGE_SIZE // WRITE_SIZE


@dataclass(frozen=True)
class Write:
    offset: int
    pattern: int


def sample_content(size: int) -> bytearray:
    """Deterministic sample data: every 4 KiB block names its own index."""
    out = bytearray(size)
    for blk in range(size // 4096):
        out[blk * 4096 : blk * 4096 + 16] = f"block {blk:09d}\n".encode()
    return out


def write_plan(count: int) -> list[Write]:
    """Writes that hop across the image and revisit slots, each with its own pattern."""
    return [Write((i * 37 % SLOTS) * WRITE_SIZE, 1 + i % 254) for i in range(count)]


def replay(base: bytes, writes: list[Write]) -> bytes:
    img = bytearray(base)
    for w in writes:
        img[w.offset : w.offset + WRITE_SIZE] = bytes([w.pattern]) * WRITE_SIZE
    return bytes(img)


def states_matching(base: bytes, plan: list[Write], copy: bytes, lo: int, hi: int) -> int | None:
    """The number k in [lo, hi] of writes after which the image equals ``copy``, if any.

    Replays the plan once, tracking which write-sized slots differ from the copy, so that
    each candidate state costs one slot comparison instead of a whole-image hash.
    """
    img = bytearray(replay(base, plan[:lo]))
    differ = {
        off
        for off in range(0, len(img), WRITE_SIZE)
        if img[off : off + WRITE_SIZE] != copy[off : off + WRITE_SIZE]
    }
    for k in range(lo, hi + 1):
        if not differ:
            return k
        if k == len(plan):
            break
        w = plan[k]
        img[w.offset : w.offset + WRITE_SIZE] = bytes([w.pattern]) * WRITE_SIZE
        if img[w.offset : w.offset + WRITE_SIZE] == copy[w.offset : w.offset + WRITE_SIZE]:
            differ.discard(w.offset)
        else:
            differ.add(w.offset)
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapimg(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapimg.cli.main", *args]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SnapimgError(f"{Path(cmd[0]).name} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


@contextmanager
def serving(image: Path, work: Path) -> Iterator[tuple[Path, Path]]:
    sock, control = work / "nbd.sock", work / "control.sock"
    cmd = _snapimg(
        "serve",
        f"disk={image}",
        "--socket",
        str(sock),
        "--control",
        str(control),
        "--store-dir",
        str(work / "store"),
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready:
            err = proc.stderr.read() if proc.stderr else ""
            raise SnapimgError(f"snapimg serve did not start: {err.strip()}")
        print(f"  serve: {ready.strip()}")
        yield sock, control
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class QemuIoWriter:
    """qemu-io in interactive mode; each write is sent after the previous one is acked."""

    def __init__(self, uri: str, plan: list[Write]) -> None:
        self.plan = plan
        self.acked = 0
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            # stdbuf: qemu-io's stdout is a pipe here; line buffering lets acks arrive at once
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()
        self.error: str | None = None

    def _run(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        for w in self.plan:
            if self.stop.is_set():
                break
            self.proc.stdin.write(f"write -P {w.pattern} {w.offset} {WRITE_SIZE}\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    self.error = "qemu-io exited"
                    return
                if "wrote " in line:
                    break
                if "error" in line.lower() or "failed" in line.lower():
                    self.error = line.strip()
                    return
            with self.lock:
                self.acked += 1

    def count(self) -> int:
        with self.lock:
            return self.acked

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=60)
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.error:
            raise SnapimgError(f"writer: {self.error}")
        return self.count()


def run_demo(workdir: Path | None = None) -> bool:
    for tool in ("qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            raise SnapimgError(f"{tool} not found (run scripts/install.sh)")
    with tempfile.TemporaryDirectory(prefix="snapimg-demo-", dir=workdir) as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        base = bytes(sample_content(IMAGE_SIZE))
        image.write_bytes(base)
        print(f"sample image {image} ({IMAGE_SIZE // MiB} MiB), sha256 {sha256(base)[:16]}")
        plan = write_plan(4000)
        with serving(image, work) as (sock, control):
            writer = QemuIoWriter(f"nbd+unix:///disk?socket={sock}", plan)
            writer.thread.start()
            while writer.count() < 40 and writer.thread.is_alive():
                writer.thread.join(0.01)
            before = writer.count()
            uri = _run(
                _snapimg("snapshot", "create", "--control", str(control), "disk@demo")
            ).strip()
            after = writer.count()
            print(f"snapshot created while writing: {uri}")
            print(f"  writes acknowledged before create: {before}, by its return: {after}")
            copy = work / "backup.img"
            _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)])
            during = writer.count()
            total = writer.finish()
            print(
                f"  writes acknowledged while the backup copied: {during - after}, in all: {total}"
            )
            listing = _run(_snapimg("snapshot", "list", "--control", str(control)))
            print("  " + listing.strip().replace("\n", "\n  "))
        copy_data = copy.read_bytes()
        k = states_matching(base, plan, copy_data, before, after + 1)
        now = sha256(image.read_bytes())
        expected_now = sha256(replay(base, plan[:total]))
        print(f"backup copy sha256             {sha256(copy_data)}")
        if k is not None:
            print(f"image after exactly {count(k, 'write')}  {sha256(replay(base, plan[:k]))}")
        else:
            print(
                f"no image state between {before} and {count(after + 1, 'write')} matches the copy"
            )
        print(
            f"origin now, after {count(total, 'write')} {now} "
            f"({'holds every write' if now == expected_now else 'WRONG'})"
        )
        ok = k is not None and now == expected_now and now != sha256(copy_data)
        print(
            "RESULT: "
            + (
                "the snapshot copy is the image exactly as it was at snapshot time"
                if ok
                else "MISMATCH"
            )
        )
        return ok
