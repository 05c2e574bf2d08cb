"""SIGINT, SIGTERM and SIGKILL during backup, restore, verify and prune: real signals sent
to real processes at moments chosen by what the process has done, not by timers."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.backup.helpers import (
    SNAPIMG,
    MiB,
    make_origin,
    manifest,
    qemu_io,
    snapimg,
    snapimg_json,
    stop,
    wait_for,
)
from tests.interop.serving import Serve

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
LINE = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def _backed_up(tmp_path: Path, serve: Callable[..., Serve], keep: str) -> tuple[Serve, Path]:
    """An origin of 160 MiB of data, one full backup kept as ``keep``, then 150 MiB
    rewritten: the next backup has enough to copy to be caught half-way."""
    disk = make_origin(tmp_path / "disk.img", 192 * MiB, "write -P 0x61 0 160M")
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "bk"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", f"disk@{keep}")
    qemu_io(srv.uri("disk"), "write -P 0x62 0 150M")
    return srv, bk


def _start(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*SNAPIMG, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _open_by_anyone(directory: Path) -> list[str]:
    """Processes that hold a file inside ``directory`` open."""
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if str(directory) in os.readlink(fd):
                    holders.append(proc.name)
        except OSError:
            continue
    return holders


def _signalled(proc: subprocess.Popen[bytes], sig: signal.Signals) -> str:
    os.kill(proc.pid, sig)  # the process only, as kill(1) or a service manager would
    _, err = proc.communicate(timeout=60)
    return err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_backup_and_drops_even_a_kept_snapshot(
    sig: signal.Signals, tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    srv, bk = _backed_up(tmp_path, serve, "first")
    before = (bk / "manifest.json").read_bytes()

    args = (
        "backup",
        "--control",
        srv.control,
        "disk",
        "--to",
        bk,
        "--since",
        "first",
        "--keep",
        "disk@second",
    )
    proc = _start(*args)
    try:
        tmp = bk / ".b0002.qcow2.tmp"
        wait_for(
            lambda: tmp.exists() and tmp.stat().st_blocks * 512 > 8 * MiB,
            proc,
            "a half-written backup file",
        )
        err = _signalled(proc, sig)
    finally:
        stop(proc)
    assert proc.returncode == STATUS[sig]
    assert err == f"snapimg backup: {LINE[sig]}\n"
    # nothing of the interrupted backup is left: files, lock, pending note, helper processes
    assert (bk / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bk.iterdir()) == ["b0001.pieces", "b0001.qcow2", "manifest.json"]
    assert _open_by_anyone(bk) == []
    # --keep named the snapshot, but the backup did not complete: it was dropped
    names = {s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)}
    assert names == {"disk@first"}
    # so the same command works now
    res = snapimg_json(*args)
    assert res["id"] == "b0002" and res["snapshot_kept"]


def test_sigkill_during_backup_is_cleaned_up_by_the_next_one(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    srv, bk = _backed_up(tmp_path, serve, "first")
    snapimg("snapshot", "drop", "--control", srv.control, "disk@first")
    before = (bk / "manifest.json").read_bytes()
    proc = _start("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@k")
    try:
        tmp = bk / ".b0002.qcow2.tmp"
        wait_for(
            lambda: tmp.exists() and tmp.stat().st_blocks * 512 > 8 * MiB,
            proc,
            "a half-written backup file",
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        stop(proc)
    assert (bk / "manifest.json").read_bytes() == before
    # the export helper died with it (PR_SET_PDEATHSIG): nobody writes the file any more
    wait_for(lambda: not _open_by_anyone(bk), None, "the helper to go")
    snapimg("restore", bk, "--to", tmp_path / "out.img")  # the listed point still restores
    names = [s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)]
    assert names == ["disk@k"]

    res = snapimg_json("backup", "--control", srv.control, "disk", "--to", bk)
    assert res["id"] == "b0002"
    killed = proc.pid
    assert not list(bk.glob(".*"))  # temporary files, .pending.json, .lock
    # and the private directory of the killed run's export helper is gone too
    assert not list(Path(tempfile.gettempdir()).glob(f"snapimg-export-{killed}-*"))

    # the very first backup of a new directory killed: the directory is still usable
    new = tmp_path / "new"
    proc = _start("backup", "--control", srv.control, "disk", "--to", new)
    try:
        tmp = new / ".b0001.qcow2.tmp"
        wait_for(
            lambda: tmp.exists() and tmp.stat().st_blocks * 512 > 8 * MiB,
            proc,
            "a half-written backup file",
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        stop(proc)
    assert not (new / "manifest.json").exists()
    assert snapimg_json("backup", "--control", srv.control, "disk", "--to", new)["id"] == "b0001"
    assert sorted(p.name for p in new.iterdir()) == ["b0001.pieces", "b0001.qcow2", "manifest.json"]
    assert snapimg_json("snapshot", "list", "--control", srv.control) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_restore_verify_and_prune(
    sig: signal.Signals, tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    srv, bk = _backed_up(tmp_path, serve, "a")
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "a")
    disk = tmp_path / "disk.img"

    out = tmp_path / "out.img"
    proc = _start("restore", bk, "--to", out)
    try:
        tmp = tmp_path / ".out.img.restore-tmp"
        wait_for(lambda: tmp.exists() and tmp.stat().st_blocks > 0, proc, "restore writing")
        err = _signalled(proc, sig)
    finally:
        stop(proc)
    assert proc.returncode == STATUS[sig] and err == f"snapimg restore: {LINE[sig]}\n"
    assert not out.exists() and not tmp.exists()

    # verify and prune: signalled while a QEMU tool they started runs
    for command in (("verify", bk), ("prune", bk, "--keep-last", "1")):
        proc = _start(*command)
        try:
            wait_for(lambda p=proc: bool(_children(p.pid)), proc, f"{command[0]}'s helper")
            err = _signalled(proc, sig)
        finally:
            stop(proc)
        assert proc.returncode == STATUS[sig], err
        assert err == f"snapimg {command[0]}: {LINE[sig]}\n"
        assert _open_by_anyone(bk) == []
        assert not (bk / ".lock").exists()
    # whatever prune had done, every listed point restores, and a new prune finishes
    listed = [r["id"] for r in manifest(bk)["backups"]]
    for rec_id in listed:
        snapimg("restore", bk, "--backup", rec_id, "--to", tmp_path / f"{rec_id}.img")
    assert (tmp_path / f"{listed[-1]}.img").read_bytes() == disk.read_bytes()
    snapimg("prune", bk, "--keep-last", "1")
    assert [r["id"] for r in manifest(bk)["backups"]] == ["b0002"]
    assert snapimg("verify", bk).returncode == 0


@pytest.mark.parametrize("tool", ["qemu-img", "qemu-storage-daemon"])
def test_a_signal_while_a_qemu_tool_starts_leaves_no_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    """SIGTERM arriving inside subprocess.Popen, after the fork and before Popen returns (the
    moment verify's wait_for above can hit): the command still ends with its line and 143,
    and the QEMU tool it was starting does not outlive it."""
    from snapimg.backup import qemuimg
    from snapimg.cli import backup as cli_backup
    from snapimg.qemuexport import QemuExport

    image = tmp_path / "x.img"
    image.write_bytes(bytes(MiB))
    started: list[int] = []
    real = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def execute_then_signal(self: subprocess.Popen[str], *args: object) -> None:
        real(self, *args)
        started.append(self.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # handled before Popen returns

    def start(args: argparse.Namespace) -> int:
        if tool == "qemu-img":
            return qemuimg.run("check", str(image)).returncode
        with QemuExport(image, "raw"):
            return 0

    monkeypatch.setattr(subprocess.Popen, "_execute_child", execute_then_signal)
    monkeypatch.setattr(cli_backup._Stop, "signum", 0)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = cli_backup._interruptible(start)(argparse.Namespace(command="verify"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    try:
        assert status == 143 and len(started) == 1
        with pytest.raises(ChildProcessError):  # killed and reaped, not left running
            os.waitpid(started[0], os.WNOHANG)
    finally:
        for pid in started:  # (a child left running: this test's failure)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
