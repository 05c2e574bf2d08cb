"""``snapimg backup --qmp SOCKET --device QDEV-ID``: a disk of a running QEMU (no guest OS,
writes by HMP qemu-io), snapshot through ``snapimg attach``; ``--since`` falls back to full."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapimg.backends.qsd.qmp import Qmp
from tests.backup.helpers import SNAPIMG, qemu_io

MiB = 1 << 20


class Vm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.disk = tmp / "disk.img"
        with self.disk.open("wb") as f:
            f.truncate(16 * MiB)
        qemu_io(str(self.disk), "write -P 0x5a 0 3M", "write -P 0xc3 8M 1M")
        self.qmp_test = tmp / "qmp-test.sock"
        self.qmp = tmp / "qmp.sock"
        self.proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-machine",
                "pc",
                "-nodefaults",
                "-S",
                "-display",
                "none",
                "-qmp",
                f"unix:{self.qmp_test},server=on,wait=off",
                "-qmp",
                f"unix:{self.qmp},server=on,wait=off",
                "-drive",
                f"if=none,id=d0,file={self.disk},format=raw",
                "-device",
                "ide-hd,drive=d0,id=ide0,bus=ide.0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.loop = asyncio.new_event_loop()
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "qemu-system-x86_64 exited"
            try:
                self.mon: Qmp = self.loop.run_until_complete(Qmp.connect(self.qmp_test, timeout=2))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def io(self, command: str) -> None:
        out = self.loop.run_until_complete(self.mon.hmp(f'qemu-io -d ide0 "{command}"'))
        assert "failed" not in out and "error" not in out.lower(), out

    def stop(self) -> None:
        try:
            self.loop.run_until_complete(self.mon.close())
        finally:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.loop.close()


@pytest.fixture
def vm() -> Iterator[Vm]:
    tmp = Path(tempfile.mkdtemp(prefix="sib-", dir="/tmp"))  # short: unix socket paths
    v = Vm(tmp)
    try:
        yield v
    finally:
        v.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def backup(vm: Vm, *args: str) -> tuple[dict[str, Any], str]:
    env = dict(os.environ, TMPDIR=str(vm.tmp))  # attach's store dir goes under TMPDIR
    proc = subprocess.run(
        [*SNAPIMG, "backup", "--qmp", str(vm.qmp), "--device", "ide0", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_qmp_full_backups_and_since_falls_back_to_full(vm: Vm) -> None:
    bk = vm.tmp / "bk"
    ref1 = vm.tmp / "ref1.img"
    shutil.copyfile(vm.disk, ref1)
    first, _ = backup(vm, "disk", "--to", str(bk), "--keep", "disk@a")
    assert first["kind"] == "full" and first["bytes_read"] >= 4 * MiB
    vm.io("write -P 0x77 1M 64k")
    vm.io("write -z 8M 512k")
    ref2 = vm.tmp / "ref2.img"
    shutil.copyfile(vm.disk, ref2)
    second, stderr = backup(vm, "disk", "--to", str(bk), "--since", "a")
    assert second["kind"] == "full" and second["parent"] is None
    assert "notice: this source cannot list the blocks changed" in stderr
    assert second["notice"] is not None

    for rec_id, ref in (("b0001", ref1), ("b0002", ref2)):
        out = vm.tmp / f"{rec_id}.img"
        proc = subprocess.run(
            [*SNAPIMG, "restore", str(bk), "--backup", rec_id, "--to", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == ref.read_bytes()
    # the second snapshot was detached, the kept one is still attached
    nodes = {
        n["node-name"]
        for n in vm.loop.run_until_complete(
            vm.mon.execute("query-named-block-nodes", {"flat": True})
        )
    }
    exports = vm.loop.run_until_complete(vm.mon.execute("query-block-exports"))
    assert len(exports) == 1
    assert any(n.endswith("-t") for n in nodes)
