"""`snapimg serve` and `snapimg snapshot` as a user runs them: lifecycle, mistakes, release."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from tests.interop.qemu_tools import qemu_io, run
from tests.interop.serving import Serve, snapimg

MiB = 1 << 20


def image(path: Path, size: int = 16 * MiB, pattern: str = "0x11") -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 {size}", str(path))
    return path


def one_line_error(proc: object, *words: str) -> None:
    rc, err = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def test_lifecycle_restart_and_sockets(
    tmp_path: Path, serve: Callable[..., Serve], datapath: str
) -> None:
    img = image(tmp_path / "vm.img")
    s = serve([f"disk={img}"])
    assert "ready" in s.ready_line and "disk" in s.ready_line
    assert f"datapath={datapath}" in s.ready_line
    assert int(s.pid_file.read_text()) == s.proc.pid
    for sock in (s.socket, s.control):
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o777 == 0o600
    out = snapimg(
        "snapshot", "create", "--control", s.control, "disk@before", "--max-size", "8M"
    ).stdout
    assert out.strip() == f"nbd+unix:///disk@before?socket={s.socket}"
    qemu_io(s.uri("disk"), "write -P 0x22 1M 3M")
    listed = json.loads(snapimg("snapshot", "list", "--control", s.control, "--json").stdout)
    assert len(listed) == 1
    info = listed[0]
    for key in (
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
    ):
        assert key in info
    assert info["name"] == "disk@before" and info["state"] == "valid"
    assert info["reason"] is None and info["max_size"] == 8 * MiB
    assert info["preserved_bytes"] >= 3 * MiB and info["writable"] is False
    table = snapimg("snapshot", "list", "--control", s.control).stdout
    assert "disk@before" in table and "valid" in table
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
    assert not s.pid_file.exists() and not s.socket.exists() and not s.control.exists()

    # Restart: the snapshot comes back from the store with its content.
    s2 = serve([f"disk={img}"])
    assert "disk@before" in s2.ready_line
    qemu_io(s2.uri("disk@before"), "read -P 0x11 0 16M", read_only=True)
    qemu_io(s2.uri("disk"), "read -P 0x22 1M 3M")
    reader = nbd.NBD()  # a client of the snapshot when it is dropped is disconnected
    reader.connect_uri(s2.uri("disk@before"))
    assert reader.pread(4, 0) == b"\x11" * 4
    snapimg("snapshot", "drop", "--control", s2.control, "disk@before")
    with pytest.raises(nbd.Error):
        reader.pread(4, 0)
    assert json.loads(snapimg("snapshot", "list", "--control", s2.control, "--json").stdout) == []
    proc = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", s2.uri("disk@before"), check=False)
    assert proc.returncode != 0 or "fail" in (proc.stdout + proc.stderr).lower()
    idle = nbd.NBD()  # a client still connected at shutdown does not hold it up
    idle.connect_uri(s2.uri("disk"))
    assert idle.pread(4, 1 * MiB) == b"\x22" * 4
    s2.proc.send_signal(signal.SIGINT)
    assert s2.proc.wait(60) == 130  # SIGINT: clean shutdown, status 128 + 2
    del idle


def test_cli_mistakes(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = image(tmp_path / "a.img", 4 * MiB)
    base = [
        "serve",
        "--socket",
        tmp_path / "x.sock",
        "--control",
        tmp_path / "x.ctl",
        "--store-dir",
        tmp_path / "st",
    ]
    one_line_error(snapimg(*base, tmp_path / "missing.img", check=False), "missing.img")
    one_line_error(snapimg(*base, f"a={img}", f"a={img}", check=False), "duplicate")
    one_line_error(snapimg(*base, img, "--block-size", "3K", check=False), "block size")
    one_line_error(snapimg(*base, img, "--tcp", "0.0.0.0:10809", check=False), "TLS")
    one_line_error(snapimg(*base, img, "--tcp", "nohost", check=False), "--tcp")
    ctl = tmp_path / "none.ctl"
    one_line_error(
        snapimg("snapshot", "list", "--control", ctl, check=False), "no snapimg server is running"
    )
    s = serve([f"a={img}"])
    ctl = s.control
    one_line_error(snapimg("snapshot", "create", "--control", ctl, "b@s", check=False), "'b'")
    one_line_error(snapimg("snapshot", "create", "--control", ctl, "a", check=False), "NAME@SNAP")
    one_line_error(
        snapimg("snapshot", "create", "--control", ctl, "a@s", "--max-size", "lots", check=False),
        "--max-size",
    )
    snapimg("snapshot", "create", "--control", ctl, "a@s")
    one_line_error(snapimg("snapshot", "create", "--control", ctl, "a@s", check=False), "a@s")
    one_line_error(snapimg("snapshot", "drop", "--control", ctl, "a@nope", check=False), "nope")
    # A second server on the same sockets is refused; the first keeps serving.
    one_line_error(
        snapimg(
            "serve",
            f"a={img}",
            "--socket",
            s.socket,
            "--control",
            tmp_path / "y.ctl",
            "--store-dir",
            tmp_path / "st2",
            check=False,
        ),
        "in use",
    )
    assert not (tmp_path / "st2").exists()  # refused before anything was created
    qemu_io(s.uri("a@s"), "read -P 0x11 0 4M", read_only=True)
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15


def test_release_frees_space_and_reads_fail(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = image(tmp_path / "r.img", 8 * MiB, "0x33")
    s = serve([f"r={img}"])
    snapimg("snapshot", "create", "--control", s.control, "r@bk")
    qemu_io(s.uri("r"), "write -P 0x44 0 8M")

    def preserved() -> int:
        out = snapimg("snapshot", "list", "--control", s.control, "--json").stdout
        return int(json.loads(out)[0]["preserved_bytes"])

    before = preserved()
    assert before >= 8 * MiB
    du_before = _store_usage(s.store)
    snapimg(
        "snapshot", "release", "--control", s.control, "r@bk", "--offset", "0", "--length", "4M"
    )
    assert preserved() <= before - 4 * MiB
    assert _store_usage(s.store) <= du_before - 4 * MiB
    proc = run(
        "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 1M 64k", s.uri("r@bk"), check=False
    )
    out = proc.stdout + proc.stderr
    assert "Input/output error" in out, out
    assert "0x33" not in out or "fail" in out.lower()
    qemu_io(s.uri("r@bk"), "read -P 0x33 4M 4M", read_only=True)
    proc = run(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        s.uri("r@bk"),
        str(tmp_path / "out.raw"),
        check=False,
    )
    assert proc.returncode != 0  # never wrong data: the copy fails
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15


def _store_usage(store: Path) -> int:
    total = 0
    for root, _, files in os.walk(store):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


@pytest.mark.parametrize("policy", ["invalidate", "block-writes"])
def test_store_limits(tmp_path: Path, serve: Callable[..., Serve], policy: str) -> None:
    img = image(tmp_path / "l.img", 8 * MiB, "0x55")
    s = serve([f"l={img}"])
    snapimg(
        "snapshot",
        "create",
        "--control",
        s.control,
        "l@small",
        "--max-size",
        "1M",
        "--on-full",
        policy,
    )
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4M", s.uri("l"), check=False)
    out = proc.stdout + proc.stderr
    info = json.loads(snapimg("snapshot", "list", "--control", s.control, "--json").stdout)[0]
    if policy == "invalidate":
        assert "fail" not in out.lower(), out
        assert info["state"] == "invalid" and info["reason"]
        proc = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", s.uri("l@small"), check=False)
        assert "Input/output error" in proc.stdout + proc.stderr
    else:
        assert "No space left on device" in out, out
        assert info["state"] == "valid"
        qemu_io(s.uri("l@small"), "read -P 0x55 0 8M", read_only=True)
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(s.uri("l@small"))
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"x" * 4096, 0)
    assert exc.value.args[1] == errno.EPERM
    h.shutdown()
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
