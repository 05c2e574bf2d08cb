"""User mistakes get one line, a non-zero exit and leave nothing behind; signals end
commands with 130 (SIGINT) and 143 (SIGTERM); size limits and releases say what they do."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapimg.imagelock import probe
from tests.interop.qemu_tools import qemu_io, run
from tests.interop.serving import SNAPIMG, Serve, bin_dir_for_any_user, snapimg
from tests.interop.test_names_and_uris import control_request

MiB = 1 << 20


def one_line_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert text in proc.stderr, proc.stderr


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A listening unix socket (``silent.sock``) whose connections nobody answers."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen(16)
        yield sock


def test_control_socket_that_is_not_snapimg(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * MiB)
    s = serve([f"d={img}"])
    one_line_error(
        snapimg("snapshot", "create", "--control", s.socket, "d@x", check=False),
        f"snapimg snapshot: {s.socket} is not a snapimg control socket (an NBD server)",
    )
    one_line_error(
        snapimg("snapshot", "list", "--control", img, check=False),
        f"snapimg snapshot: {img} is not a socket",
    )
    chatty = tmp_path / "chatty.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(chatty))
        server.listen(1)
        proc = subprocess.Popen(
            [*SNAPIMG, "snapshot", "list", "--control", str(chatty)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        conn, _ = server.accept()
        conn.sendall(b'{"QMP": {"version": {}}}\n')
        out, err = proc.communicate(timeout=60)
        conn.close()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert 'is not a snapimg control socket (it answered \'{"QMP": {"versio\')' in err
    qemu_io(s.uri("d"), "read 0 4k")  # the NBD server was not disturbed
    assert s.stop() == 143


def test_serve_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * MiB)
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    before = listing(tmp_path)

    def serve(
        *extra: str | Path,
        store: str | Path = tmp_path / "store",
        sock: str | Path = tmp_path / "n.sock",
    ) -> subprocess.CompletedProcess[str]:
        return snapimg(
            "serve",
            f"d={img}",
            "--socket",
            sock,
            "--control",
            tmp_path / "c.sock",
            "--store-dir",
            store,
            *extra,
            check=False,
        )

    for image in (tmp_path / "fifo", "/dev/null"):  # nothing may hang or be opened
        proc = snapimg(
            "serve",
            image,
            "--socket",
            tmp_path / "n.sock",
            "--control",
            tmp_path / "c.sock",
            "--store-dir",
            tmp_path / "store",
            check=False,
        )
        one_line_error(proc, f"image {image} is not a regular file or block device")
    one_line_error(serve(store="/proc/nope"), "cannot create --store-dir /proc/nope")
    one_line_error(serve(store=tmp_path / "no/store"), f"no such directory {tmp_path / 'no'}")
    one_line_error(serve(store=tmp_path / "afile"), "is not a directory")
    one_line_error(serve("--pid-file", tmp_path / "no/pid"), "--pid-file")
    one_line_error(serve(sock=tmp_path / ("x" * 120)), "unix sockets allow 107 bytes")
    one_line_error(serve("--block-size", "1000000000000000000000000"), "bad block size")
    with socket.socket() as taken:  # fails after the store was created: it goes again
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(serve("--tcp", f"127.0.0.1:{port}"), f"127.0.0.1:{port}")
    assert listing(tmp_path) == before
    assert not probe(img).in_use


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to user nobody")
def test_unreadable_paths_as_a_user(tmp_path: Path) -> None:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"snapimg-user-{os.getpid()}"
    work.mkdir()
    try:
        nobody = pwd.getpwnam("nobody")
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        secret = work / "secret.img"
        secret.write_bytes(b"\0" * MiB)
        secret.chmod(0o600)  # root's
        bin_dir = bin_dir_for_any_user()
        if bin_dir is None:
            pytest.skip(
                "no snapimg installation other users may run (scripts/install.sh makes .venv)"
            )
        cmd = ["runuser", "-u", "nobody", "--", str(bin_dir / "snapimg")]
        proc = subprocess.run(
            [*cmd, "serve", str(secret), "--socket", str(work / "n.sock"), "--control",
             str(work / "c.sock"), "--store-dir", str(work / "store")],
            capture_output=True, text=True, timeout=60, cwd=work,
        )  # fmt: skip
        one_line_error(proc, f"cannot open image {secret}: Permission denied")
        proc = subprocess.run(
            [*cmd, "checksum", str(secret)], capture_output=True, text=True, timeout=60, cwd=work
        )
        one_line_error(proc, "Permission denied")
        proc = subprocess.run(
            [*cmd, "serve", str(secret), "--socket", "/n.sock", "--control",
             str(work / "c.sock"), "--store-dir", str(work / "store")],
            capture_output=True, text=True, timeout=60, cwd=work,
        )  # fmt: skip
        one_line_error(proc, "cannot create socket /n.sock: / is not writable")
        assert sorted(p.name for p in work.iterdir()) == ["secret.img"]
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


def test_out_of_range_numbers(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x33" * 4 * MiB)
    s = serve([f"d={img}"])
    one_line_error(
        snapimg(
            "snapshot",
            "create",
            "--control",
            s.control,
            "d@big",
            "--max-size",
            "1000000000000000000000",
            check=False,
        ),
        "snapimg snapshot: bad --max-size '1000000000000000000000': must be from 0 to",
    )
    for value in (10**21, -1, 1.5, True, "1G", [1], {"a": 1}):
        response = control_request(
            s.control, "create_snapshot", origin="d", snap="big", max_size=value
        )
        assert response["error"]["type"] == "ControlError", response
        assert "parameter 'max_size' must be an integer from 0 to" in response["error"]["message"]
    for key in ("offset", "length"):
        params = {"origin": "d", "snap": "nope", "offset": 0, "length": 0, key: 2**64}
        response = control_request(s.control, "release", **params)
        assert f"parameter '{key}'" in response["error"]["message"]
    assert json.loads(snapimg("snapshot", "list", "--control", s.control, "--json").stdout) == []
    qemu_io(s.uri("d"), "read -P 0x33 0 4M")
    assert s.stop() == 143
    assert "Traceback" not in s.stderr() and s.stderr() == ""


def test_max_size_and_release_granularity(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x44" * 4 * MiB)
    s = serve([f"d={img}"])
    for size in ("0", "10", "65535"):
        one_line_error(
            snapimg(
                "snapshot", "create", "--control", s.control, "d@s", "--max-size", size, check=False
            ),
            f"max size {size} bytes is below one block (65536 bytes)",
        )
    snapimg("snapshot", "create", "--control", s.control, "d@s", "--max-size", "64K")
    qemu_io(s.uri("d"), "write -P 0x55 0 64k")  # exactly one block preserved: still valid
    listed = json.loads(snapimg("snapshot", "list", "--control", s.control, "--json").stdout)
    assert listed[0]["state"] == "valid" and listed[0]["preserved_blocks"] == 1

    def release(offset: str, length: str) -> subprocess.CompletedProcess[str]:
        return snapimg(
            "snapshot",
            "release",
            "--control",
            s.control,
            "d@s",
            "--offset",
            offset,
            "--length",
            length,
            check=False,
        )

    one_line_error(
        release("0", "4K"),
        "range 0+4096 covers no whole block of 64.0 KiB: "
        "nothing released (release frees whole blocks only)",
    )
    one_line_error(release("4K", "64K"), "covers no whole block")
    one_line_error(release("4M", "1"), "runs past the end of d@s")
    qemu_io(s.uri("d@s"), "read -P 0x44 0 64k", read_only=True)  # nothing was released
    proc = release("4K", "132K")  # blocks 1 only: [64K, 128K)
    assert proc.returncode == 0 and proc.stderr == (
        "snapimg snapshot: released 64.0 KiB at offset 65536 (whole blocks only: the partial "
        "blocks at the edges of 4096+135168 stay stored)\n"
    )
    assert release("0", "64K").stderr == ""  # exactly whole blocks: nothing to say
    assert release("0", "4M").returncode == 0
    assert s.stop() == 143


def test_odd_sized_image_warning(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(b"\x66" * 1_000_000)
    s = serve([f"odd={img}"])
    assert s.stderr() == (
        f"snapimg serve: warning: odd ({img}) is 1000000 bytes, not a multiple of 512: QEMU "
        "clients (qemu-img, qemu-io, VMs) see 1000448 bytes, the last 448 reading as zeros "
        "and refusing writes; nbdinfo and nbdcopy see 1000000\n"
    )
    assert run("nbdinfo", "--size", s.uri("odd")).stdout.strip() == "1000000"
    info = json.loads(run("qemu-img", "info", "--output=json", s.uri("odd")).stdout)
    assert info["virtual-size"] == 1000448
    qemu_io(s.uri("odd"), "read -P 0x66 999424 576", "read -P 0 1000000 448")
    assert "Invalid argument" in qemu_io(s.uri("odd"), "write 999936 512", check=False)
    assert s.stop() == 143
    quiet = snapimg(
        "serve",
        f"odd={img}",
        "--socket",
        s.socket,
        "--control",
        s.control,
        "--store-dir",
        s.store,
        "--pid-file",
        s.pid_file,
        "--daemonize",
        "-q",
    )
    try:
        assert quiet.stdout == "" and quiet.stderr == ""
    finally:
        stop_daemon(s.pid_file)


def test_the_pid_file_goes_last(tmp_path: Path) -> None:
    """A script that stops the server and waits for its pid file to go may then open the
    image with QEMU: the image locks are released and the sockets gone by then.  strace
    holds each unlink(2) for 1 s after it happened, so a pid file removed before the
    locks were released would leave them held through that second."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\x77" * MiB)
    pid_file, sock, control = tmp_path / "pid", tmp_path / "n.sock", tmp_path / "c.sock"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=unlink,unlinkat",
         "-e", "inject=unlink,unlinkat:delay_exit=1000000",
         *SNAPIMG, "serve", f"d={img}", "--socket", str(sock), "--control", str(control),
         "--store-dir", str(tmp_path / "store"), "--pid-file", str(pid_file), "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().endswith("\n")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        assert probe(img).in_use
        stop_daemon(pid_file)
        assert not probe(img).in_use
        assert not sock.exists() and not control.exists()
        assert proc.wait(60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_daemon(pid_file: Path) -> None:
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_waiting_commands(silent_socket: socket.socket, sig: signal.Signals) -> None:
    expected = {signal.SIGTERM: (143, "terminated"), signal.SIGINT: (130, "interrupted")}[sig]
    path = silent_socket.getsockname()
    uri = f"nbd+unix:///x?socket={path}"
    for args in (
        ["snapshot", "list", "--control", str(path)],
        ["snapshot", "create", "--control", str(path), "d@s"],
        ["inspect", uri],
        ["ls", uri],
        ["diff", uri, uri],
        ["attach", "--qmp", str(path), "--device", "d0", "d@s"],
    ):
        proc = subprocess.Popen(
            [*SNAPIMG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        silent_socket.settimeout(60)
        conn, _ = silent_socket.accept()  # it connected: now waiting for an answer
        time.sleep(0.3)  # (past its first read)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        conn.close()
        assert (proc.returncode, err) == (expected[0], f"snapimg {args[0]}: {expected[1]}\n")


def test_serve_exit_status_on_signals(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * MiB)
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        s = Serve(tmp_path, [f"d={img}"])
        s.proc.send_signal(sig)
        assert s.proc.wait(60) == status
        assert not s.socket.exists() and not s.control.exists() and not s.pid_file.exists()


def test_daemonize(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x77" * MiB)
    args = ["serve", f"d={img}", "--socket", tmp_path / "n.sock", "--control",
            tmp_path / "c.sock", "--store-dir", tmp_path / "store", "--pid-file",
            tmp_path / "pid", "--daemonize"]  # fmt: skip
    proc = snapimg(*args)  # returns: the server runs on
    assert proc.stdout.startswith("snapimg serve: ready ") and proc.stderr == ""
    pid = int((tmp_path / "pid").read_text())
    assert f"pid={pid}" in proc.stdout
    try:
        assert [h.pid for h in probe(img).holders] == [pid]
        uri = snapimg("snapshot", "create", "--control", tmp_path / "c.sock", "d@s").stdout
        qemu_io(uri.strip(), "read -P 0x77 0 1M", read_only=True)
        again = snapimg(*args, check=False)  # the same again: its sockets are taken
        one_line_error(again, "is in use by another server")
        other = [str(a).replace("/n.sock", "/m.sock").replace("/c.sock", "/e.sock") for a in args]
        one_line_error(snapimg(*other, check=False), f"in use by snapimg (pid {pid})")
    finally:
        stop_daemon(tmp_path / "pid")
    assert not (tmp_path / "n.sock").exists() and not probe(img).in_use
    quiet = snapimg(*args, "-q")
    try:
        assert quiet.stdout == "" and quiet.stderr == ""
    finally:
        stop_daemon(tmp_path / "pid")
