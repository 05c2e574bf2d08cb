"""Snapshot create is atomic with respect to writes in flight: every write acknowledged
before `snapshot create` starts is in the snapshot, none started after it returned is."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbd

from tests.interop.serving import Serve, snapimg

BLOCK = 4096
SLOTS = 8192  # per writer; paced so that writing them all outlasts the create


def test_create_during_writes(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "busy.img"
    with img.open("wb") as f:
        f.truncate(2 * SLOTS * BLOCK)
    s = serve([f"busy={img}"])
    lock = threading.Lock()
    acked = [-1, -1]  # per writer: highest slot acknowledged
    started = [-1, -1]  # per writer: highest slot whose write was issued
    stop = threading.Event()
    created = threading.Event()  # (writers keep slots for writes after the create)

    def writer(w: int) -> None:
        h = nbd.NBD()
        h.connect_uri(s.uri("busy"))
        for i in range(SLOTS):
            if stop.is_set():
                break
            if i == SLOTS - 16:  # a slow create must still see writes after it
                created.wait(120)
            with lock:
                started[w] = i
            h.pwrite(bytes([w * 100 + i % 97 + 1]) * BLOCK, (w * SLOTS + i) * BLOCK)
            with lock:
                acked[w] = i
            stop.wait(0.0005)
        h.shutdown()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    while min(acked) < 50:
        threading.Event().wait(0.01)
    with lock:
        acked_before = list(acked)
    snapimg("snapshot", "create", "--control", s.control, "busy@t")
    with lock:
        started_after = [n + 1 for n in started]
    created.set()
    deadline = time.monotonic() + 30  # until each writer had a write acked after create
    while any(a <= b for a, b in zip(acked, started_after, strict=True)):
        if time.monotonic() > deadline or not any(t.is_alive() for t in threads):
            break
        threading.Event().wait(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert all(a > b for a, b in zip(acked, started_after, strict=True)), "writes after create"

    h = nbd.NBD()
    h.connect_uri(s.uri("busy@t"))
    chunk = 16 << 20
    snap = b"".join(h.pread(chunk, off) for off in range(0, 2 * SLOTS * BLOCK, chunk))
    h.shutdown()
    origin = img.read_bytes()
    for w in range(2):
        for i in range(SLOTS):
            off = (w * SLOTS + i) * BLOCK
            want = bytes([w * 100 + i % 97 + 1]) * BLOCK
            if i <= acked[w]:
                assert origin[off : off + BLOCK] == want
            if i <= acked_before[w]:
                assert snap[off : off + BLOCK] == want, f"writer {w} slot {i} acked before create"
            elif i >= started_after[w]:
                assert snap[off : off + BLOCK] == bytes(BLOCK), f"writer {w} slot {i} after create"
            else:  # in flight during create: either, but never torn
                assert snap[off : off + BLOCK] in (want, bytes(BLOCK))
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
