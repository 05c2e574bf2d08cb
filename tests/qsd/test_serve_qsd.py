"""`snapimg serve --backend qsd` as a process: daemon death, snapimg death, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qsd_clients import MiB, make_origin, qemu_io


def start_serve(tmp: Path, *extra: str) -> subprocess.Popen[str]:
    make_origin(tmp / "disk.img", 4 * MiB, [(0x11, 0, MiB)])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snapimg.cli.main",
            "serve",
            str(tmp / "disk.img"),
            "--socket",
            str(tmp / "nbd.sock"),
            "--control",
            str(tmp / "ctl.sock"),
            "--store-dir",
            str(tmp / "store"),
            "--backend",
            "qsd",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line, proc.stderr.read() if proc.stderr else line


def daemon_pid(serve_pid: int) -> int:
    """The qemu-storage-daemon child of ``serve_pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError, ValueError):
            continue
        if ppid == serve_pid and cmd.endswith(b"qemu-storage-daemon"):
            found.append(int(entry.name))
    assert len(found) == 1, f"expected one qemu-storage-daemon child of {serve_pid}: {found}"
    return found[0]


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_daemon_death_makes_serve_say_so_and_exit_non_zero(short_tmp: Path) -> None:
    proc = start_serve(short_tmp)
    try:
        wait_ready(proc)
        os.kill(daemon_pid(proc.pid), signal.SIGKILL)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
        assert rc != 0
        assert "qemu-storage-daemon" in err and "died" in err and "Traceback" not in err
        assert not (short_tmp / "nbd.sock").exists()
    finally:
        kill(proc)


def test_killed_serve_takes_the_daemon_along_and_a_restart_works(short_tmp: Path) -> None:
    proc = start_serve(short_tmp)
    try:
        wait_ready(proc)
        qsd = daemon_pid(proc.pid)
        cmdline = Path(f"/proc/{qsd}/cmdline").read_bytes().decode()
        killed_rundir = Path(cmdline.split("path=")[1].split(",")[0]).parent
        assert (killed_rundir / "owner.pid").read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert gone(qsd), "qemu-storage-daemon outlived snapimg serve"
    finally:
        kill(proc)
    proc = start_serve(short_tmp)  # the stale NBD socket is cleaned up
    try:
        wait_ready(proc)
        qemu_io(f"nbd+unix:///disk?socket={short_tmp / 'nbd.sock'}", "read -P 0x11 0 1M")
        assert not killed_rundir.exists(), "the killed server's run dir was not cleaned up"
        for opts, msg in (
            (["--writable"], "writable snapshots are not supported"),
            (["--max-size", "4K"], "below one block"),
        ):
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "snapimg.cli.main",
                    "snapshot",
                    "create",
                    "--control",
                    str(short_tmp / "ctl.sock"),
                    "disk@w",
                    *opts,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and msg in cli.stderr
        ctl = str(short_tmp / "ctl.sock")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "snapimg.cli.main",
                "snapshot",
                "create",
                "--control",
                ctl,
                "disk@r",
            ],
            check=True,
            capture_output=True,
        )
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "snapimg.cli.main",
                "snapshot",
                "release",
                "--control",
                ctl,
                "--offset",
                "0",
                "--length",
                "64K",
                "disk@r",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cli.returncode == 1 and cli.stderr.count("\n") == 1
        assert "release is not supported by the qsd backend" in cli.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143  # SIGTERM: clean shutdown, status 128 + 15
        kill(proc)


def test_tcp_is_refused_in_one_line(short_tmp: Path) -> None:
    proc = start_serve(short_tmp, "--tcp", "127.0.0.1:10809")
    try:
        rc = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
        assert rc == 1 and err.count("\n") == 1 and "--tcp is not supported" in err
    finally:
        kill(proc)
