"""snapimg attach/detach against a real qemu-system-x86_64 (no guest OS: -S, writes by HMP)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
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
    read_file,
    same_bytes,
)

from snapimg.backends.attach import NBD_SERVER_RUNNING
from snapimg.backends.qsd.qmp import Qmp
from snapimg.errors import QemuError

SIZE = 16 * MiB
DEVICES = ("ide0", "lsi0", "vs0")  # ide-hd, scsi-hd on lsi53c895a, scsi-hd on virtio-scsi


class Vm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.qmp_test = tmp / "qmp-test.sock"  # the test's monitor
        self.qmp = tmp / "qmp.sock"  # snapimg's monitor
        for dev in DEVICES:
            make_origin(self.disk(dev), SIZE, [(0x5A, 0, 4 * MiB), (0xC3, 8 * MiB, 2 * MiB)])
        d = {dev: self.disk(dev) for dev in DEVICES}
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
                f"if=none,id=d0,file={d['ide0']},format=raw",
                "-device",
                "ide-hd,drive=d0,id=ide0,bus=ide.0",
                "-device",
                "lsi53c895a,id=lsi",
                "-drive",
                f"if=none,id=d1,file={d['lsi0']},format=raw",
                "-device",
                "scsi-hd,drive=d1,id=lsi0,bus=lsi.0",
                "-device",
                "virtio-scsi-pci,id=vscsi",
                "-blockdev",
                f"driver=file,filename={d['vs0']},node-name=f2",
                "-blockdev",
                "driver=raw,file=f2,node-name=d2",
                "-device",
                "scsi-hd,drive=d2,id=vs0,bus=vscsi.0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.loop = asyncio.new_event_loop()
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "qemu-system-x86_64 exited"
            try:
                self.mon: Qmp = self.run(Qmp.connect(self.qmp_test, timeout=2))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def disk(self, dev: str) -> Path:
        return self.tmp / f"{dev}.img"

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def qmp_cmd(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.run(self.mon.execute(cmd, args))

    def io(self, dev: str, command: str) -> None:
        out = self.run(self.mon.hmp(f'qemu-io -d {dev} "{command}"'))
        assert "failed" not in out and "error" not in out.lower(), out

    def state(self) -> tuple[set[str], dict[str, str], list[Any], list[Any]]:
        nodes = {n["node-name"] for n in self.qmp_cmd("query-named-block-nodes", {"flat": True})}
        roots = {b["qdev"]: b["inserted"]["node-name"] for b in self.qmp_cmd("query-block")}
        return nodes, roots, self.qmp_cmd("query-block-jobs"), self.qmp_cmd("query-block-exports")

    def stop(self) -> None:
        try:
            self.run(self.mon.close())
        finally:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.loop.close()


@pytest.fixture
def vm(short_tmp: Path) -> Iterator[Vm]:
    v = Vm(short_tmp)
    try:
        yield v
    finally:
        v.stop()


def snapimg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def attach(vm: Vm, dev: str, name: str) -> str:
    proc = snapimg(
        "attach", "--qmp", str(vm.qmp), "--device", dev, name, "--store-dir", str(vm.tmp / "store")
    )
    assert proc.returncode == 0, proc.stderr
    [uri] = proc.stdout.splitlines()
    assert uri == f"nbd+unix:///{name}?socket={vm.tmp / 'store' / 'nbd.sock'}"
    return uri


def detach(vm: Vm, name: str) -> None:
    proc = snapimg("detach", "--qmp", str(vm.qmp), name)
    assert proc.returncode == 0, proc.stderr


def check_exact(uri: str, ref: Path, tmp: Path, rewritten: list[tuple[int, int]]) -> None:
    for copy in (copy_convert, copy_dd, copy_nbdcopy):
        out = tmp / "copy.img"
        copy(uri, out)
        assert same_bytes(out, ref), f"{copy.__name__} of {uri} differs from the snapshot"
        out.unlink()
    for off, length in rewritten:
        start = off + length // 2
        assert pread(uri, start, 3 * 65536) == read_file(ref, start, 3 * 65536)


@pytest.mark.parametrize("dev", DEVICES)
def test_attach_two_snapshots_then_detach_leaves_the_vm_as_before(vm: Vm, dev: str) -> None:
    before = vm.state()
    ref1 = vm.tmp / "ref1.img"
    shutil.copyfile(vm.disk(dev), ref1)
    uri1 = attach(vm, dev, "disk@one")
    assert (vm.tmp / "store" / "nbd.sock").stat().st_mode & 0o777 == 0o600
    # Guest-style writes after the snapshot: overwrites across cluster edges, zeroes, discard.
    vm.io(dev, "write -P 0xab 0 64k")
    vm.io(dev, "write -P 0xad 0xf8000 64k")
    vm.io(dev, "write -z 0x808000 0x10000")
    vm.io(dev, "discard 0x900000 0x20000")
    ref2 = vm.tmp / "ref2.img"
    shutil.copyfile(vm.disk(dev), ref2)
    uri2 = attach(vm, dev, "disk@two")
    vm.io(dev, "write -P 0x1d 0x10000 0x40000")
    vm.io(dev, "write -z 0x3f0000 0x20000")
    rewritten = [
        (0, 0x10000),
        (0xF8000, 0x10000),
        (0x808000, 0x10000),
        (0x900000, 0x20000),
        (0x10000, 0x40000),
        (0x3F0000, 0x20000),
    ]
    check_exact(uri1, ref1, vm.tmp, rewritten)
    check_exact(uri2, ref2, vm.tmp, rewritten)
    detach(vm, "disk@one")
    vm.io(dev, "write -P 0x77 0x800000 0x30000")
    check_exact(uri2, ref2, vm.tmp, [(0x800000, 0x30000)])
    detach(vm, "disk@two")
    assert vm.state() == before
    assert not (vm.tmp / "store" / "nbd.sock").exists()
    assert not list((vm.tmp / "store").glob("*.qcow2"))
    vm.io(dev, "write -P 0x99 0 64k")
    vm.io(dev, "read -P 0x99 0 64k")


def test_attach_and_detach_mistakes_are_one_line_errors(vm: Vm) -> None:
    before = vm.state()
    proc = snapimg(
        "attach",
        "--qmp",
        str(vm.qmp),
        "--device",
        "nope",
        "disk@s",
        "--store-dir",
        str(vm.tmp / "store"),
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no disk device 'nope'" in proc.stderr and "ide0" in proc.stderr
    proc = snapimg("detach", "--qmp", str(vm.qmp), "disk@never")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no snapshot disk@never is attached" in proc.stderr
    proc = snapimg("attach", "--qmp", str(vm.tmp / "missing.sock"), "--device", "ide0", "d@s")
    assert proc.returncode == 1 and "cannot connect to QMP socket" in proc.stderr
    proc = snapimg(
        "attach",
        "--qmp",
        str(vm.qmp),
        "--device",
        "ide0",
        "disk@s",
        "--store-dir",
        str(vm.tmp / "store"),
        "--socket",
        "/nonexistent/nbd.sock",
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "QMP error GenericError: " in proc.stderr
    assert proc.stderr.rstrip().endswith("(command nbd-server-start)")
    assert vm.state() == before
    attach(vm, "ide0", "disk@s")
    proc = snapimg(
        "attach",
        "--qmp",
        str(vm.qmp),
        "--device",
        "ide0",
        "disk@s",
        "--store-dir",
        str(vm.tmp / "store"),
    )
    assert proc.returncode == 1 and "already attached" in proc.stderr
    detach(vm, "disk@s")
    assert vm.state() == before
    # an NBD server snapimg did not start: QEMU refuses a second one (matched on the
    # error's fields, which this QEMU fills as attach expects), attach refuses to share it
    other = {"addr": {"type": "unix", "data": {"path": str(vm.tmp / "other.sock")}}}
    vm.qmp_cmd("nbd-server-start", other)
    with pytest.raises(QemuError) as err:
        vm.qmp_cmd("nbd-server-start", other)
    assert (err.value.error_class, err.value.desc, err.value.command) == (
        "GenericError",
        NBD_SERVER_RUNNING,
        "nbd-server-start",
    )
    assert str(err.value) == (
        f"QMP error GenericError: {NBD_SERVER_RUNNING} (command nbd-server-start)"
    )
    proc = snapimg(
        "attach",
        "--qmp",
        str(vm.qmp),
        "--device",
        "ide0",
        "disk@s",
        "--store-dir",
        str(vm.tmp / "store"),
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "already runs an NBD server that snapimg did not start" in proc.stderr
    vm.qmp_cmd("nbd-server-stop")
    assert vm.state() == before
