"""One behaviour, two data planes: `snapimg serve --backend native|qsd` through the CLI.

The image-fleecing cases, several snapshots, overflow under both policies, restart and
teardown, checked with real NBD clients.  Documented differences are asserted as such:
qsd snapshots do not survive a restart (reported invalid with a reason).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qsd_clients import (
    MiB,
    copy_convert,
    copy_dd,
    copy_nbdcopy,
    make_origin,
    pread,
    qemu_io,
    read_file,
    run,
    same_bytes,
)

BACKENDS = ("native", "qsd")
SIZE = 16 * MiB
PATTERNS = [
    (0x5D, 0, 0x10000),
    (0xD5, 0x100000, 0x10000),
    (0xDC, 0x800000, 0x10000),
    (0xCD, SIZE - 0x10000, 0x10000),
]
OVERWRITES = [
    (0xAB, 0, 0x10000),  # full
    (0xAD, 0x0F8000, 0x10000),  # partial-left
    (0x1D, 0x808000, 0x10000),  # partial-right
    (0xEA, SIZE - 0x20000, 0x10000),
]  # adjacent-left
ZEROES = [(0x0F8000, 0x8000), (0x810000, 0x8000), (SIZE - 0x20000, 0x10000)]


def snapimg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


class Server:
    def __init__(self, tmp: Path, backend: str, images: list[str]) -> None:
        self.tmp, self.backend, self.images = tmp, backend, images
        self.socket, self.control = tmp / "nbd.sock", tmp / "ctl.sock"
        self.store = tmp / "store"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapimg.cli.main",
                "serve",
                *self.images,
                "--socket",
                str(self.socket),
                "--control",
                str(self.control),
                "--store-dir",
                str(self.store),
                "--backend",
                self.backend,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        err = self.proc.stderr.read() if self.proc.stderr and not line else ""
        assert "ready" in line, f"serve did not start: {line}{err}"

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        return rc

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def create(self, name: str, *opts: str) -> str:
        proc = snapimg("snapshot", "create", "--control", str(self.control), name, *opts)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == self.uri(name)
        return proc.stdout.strip()

    def drop(self, name: str) -> None:
        proc = snapimg("snapshot", "drop", "--control", str(self.control), name)
        assert proc.returncode == 0, proc.stderr

    def list(self) -> dict[str, dict[str, Any]]:
        proc = snapimg("snapshot", "list", "--control", str(self.control), "--json")
        assert proc.returncode == 0, proc.stderr
        return {s["name"]: s for s in json.loads(proc.stdout)}

    def export_names(self) -> set[str]:
        out = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={self.socket}")
        return {e["export-name"] for e in json.loads(out)["exports"]}


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Server]:
    make_origin(short_tmp / "disk.img", SIZE, PATTERNS)
    # Overflow tests preserve non-zero data: qsd stores copied zero blocks for free.
    make_origin(short_tmp / "other.img", SIZE, [(0x31, 0, SIZE)])
    make_origin(short_tmp / "third.img", SIZE, [(0x37, 0, SIZE)])
    s = Server(
        short_tmp, request.param, [str(short_tmp / f"{n}.img") for n in ("disk", "other", "third")]
    )
    s.start()
    try:
        yield s
    finally:
        if s.proc is not None:
            s.stop()


def reference(server: Server, name: str, image: str = "disk") -> Path:
    ref = server.tmp / f"ref-{name}.img"
    shutil.copyfile(server.tmp / f"{image}.img", ref)
    return ref


def check_exact(server: Server, export: str, ref: Path, rewritten: list[tuple[int, int]]) -> None:
    uri = server.uri(export)
    for copy in (copy_convert, copy_dd, copy_nbdcopy):
        out = server.tmp / "copy.img"
        copy(uri, out)
        assert same_bytes(out, ref), f"{copy.__name__} of {export} ({server.backend}) differs"
        out.unlink()
    for off, length in rewritten:
        start = off + length // 2  # starts inside a rewritten block, runs past it
        n = min(3 * 65536, SIZE - start)
        assert pread(uri, start, n) == read_file(ref, start, n)


def test_fleecing_cases_and_several_snapshots(server: Server) -> None:
    origin = server.uri("disk")
    ref1 = reference(server, "one")
    server.create("disk@one")
    qemu_io(origin, *(f"write -P {p} {o} {n}" for p, o, n in OVERWRITES))
    qemu_io(origin, *(f"write -z {o} {n}" for o, n in ZEROES))
    qemu_io(origin, "write -z -u 0x100000 0x8000", "discard 0x400000 0x20000")
    snap = server.uri("disk@one")
    for p, o, n in PATTERNS:
        qemu_io(snap, f"read -P {p} {o} {n}")
    rewritten = [(o, n) for _, o, n in OVERWRITES] + ZEROES + [(0x100000, 0x8000)]
    check_exact(server, "disk@one", ref1, rewritten)

    ref2 = reference(server, "two")
    server.create("disk@two")
    qemu_io(origin, "write -P 0x22 0x8000 0x30000", "write -z 0x900000 0x10000")
    ref3 = reference(server, "three")
    server.create("disk@three")
    qemu_io(origin, "write -P 0x23 0x10000 0x50000")
    assert {"disk@one", "disk@two", "disk@three"} <= server.export_names()
    server.drop("disk@two")
    assert "disk@two" not in server.export_names()
    assert set(server.list()) == {"disk@one", "disk@three"}
    qemu_io(origin, "write -P 0x24 0 0x100000")
    more = [(0x8000, 0x30000), (0x10000, 0x50000), (0, 0x100000)]
    check_exact(server, "disk@one", ref1, rewritten + more)
    check_exact(server, "disk@three", ref3, more)
    assert ref2.exists()
    info = server.list()["disk@one"]
    assert {
        "name",
        "created",
        "state",
        "reason",
        "preserved_blocks",
        "preserved_bytes",
        "max_size",
        "block_size",
        "writable",
        "on_full",
    } <= set(info)
    assert info["state"] == "valid" and info["preserved_bytes"] > 0
    assert info["preserved_blocks"] * info["block_size"] >= info["preserved_bytes"]


def test_overflow_under_both_policies(server: Server) -> None:
    ref = reference(server, "bw", "other")
    server.create("other@bw", "--max-size", "1M", "--on-full", "block-writes")
    server.create("third@inv", "--max-size", "1M", "--on-full", "invalidate")
    other, third = server.uri("other"), server.uri("third")
    for i in range(16):  # exactly 1 MiB of preserved blocks
        qemu_io(other, f"write -P 0x42 {i * 0x20000} 0x10000")
    out = qemu_io(other, "write -P 0x43 0x400000 0x10000", expect_fail=True)
    assert "No space left on device" in out
    qemu_io(other, "write -P 0x44 0 0x10000")  # an already preserved block: fine
    for i in range(32):  # 2 MiB: the writer never fails
        qemu_io(third, f"write -P 0x45 {i * 0x10000} 0x10000")
    qemu_io(third, "read -P 0x45 0 2M")
    listed = server.list()
    bw, inv = listed["other@bw"], listed["third@inv"]
    assert bw["state"] == "valid" and bw["reason"] is None and bw["max_size"] == MiB
    assert bw["on_full"] == "block-writes" and inv["on_full"] == "invalidate"
    assert inv["state"] == "invalid" and inv["reason"]
    out = qemu_io(server.uri("third@inv"), "read 0 64k", expect_fail=True)
    assert "Input/output error" in out  # both backends answer EIO
    check_exact(server, "other@bw", ref, [(0, 0x10000)])
    proc = subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            server.uri("third@inv"),
            str(server.tmp / "inv.img"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0, "an invalid snapshot must not be readable"


def test_restart_and_teardown(server: Server) -> None:
    ref = reference(server, "s")
    server.create("disk@s")
    qemu_io(server.uri("disk"), "write -P 0x66 0 0x200000")
    assert server.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
    assert not server.socket.exists() and not server.control.exists()
    assert not list(server.store.glob("*.qcow2"))  # qsd: no target file left behind
    server.start()
    info = server.list()["disk@s"]
    if server.backend == "native":  # the persistent store reopens
        assert info["state"] == "valid"
        check_exact(server, "disk@s", ref, [(0, 0x200000)])
    else:  # documented: qsd snapshots are lost
        assert info["state"] == "invalid"
        assert "do not survive a restart" in info["reason"]
        out = qemu_io(server.uri("disk@s"), "read 0 64k", expect_fail=True)
        assert "Input/output error" in out  # an error, never stale data
    server.drop("disk@s")
    assert server.list() == {}
    assert server.export_names() == {"disk", "other", "third"}
    proc = snapimg("snapshot", "drop", "--control", str(server.control), "disk@s")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert server.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
    assert not server.socket.exists()
