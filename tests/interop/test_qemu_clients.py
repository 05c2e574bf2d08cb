"""QEMU itself as the NBD client: a qemu-system-x86_64 process writing through the engine
(HMP qemu-io on a virtio-blk device backed by -blockdev driver=nbd), and QEMU's TLS client."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.interop.qemu_tools import qemu_io, run
from tests.interop.serving import Serve, snapimg
from tests.nbd.tlscerts import make_certs

MiB = 1 << 20


class Hmp:
    """qemu-system-x86_64 with no guest OS, its HMP monitor on stdio."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine",
             "pc,accel=tcg", "-monitor", "stdio", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.command("")  # wait for the first prompt

    def command(self, line: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        out = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not out.rstrip().endswith(b"(qemu)") or (line and line.encode() not in out):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(
                    f"no HMP prompt after {line!r}: {out.decode(errors='replace')}"
                )
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    continue
                out += chunk
        return out.decode(errors="replace")

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def test_qemu_system_writes_through_engine(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    img = tmp_path / "guest.img"
    with img.open("wb") as f:
        f.truncate(16 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x10 0 16M", str(img))
    s = serve([f"guest={img}"])
    vm = Hmp(
        "-blockdev",
        f"driver=nbd,node-name=nbd0,server.type=unix,server.path={s.socket},export=guest",
        "-device", "virtio-blk-pci,drive=nbd0,id=vd0",
    )  # fmt: skip
    try:
        out = vm.command('qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x21 0 1M"')
        assert "wrote 1048576/1048576" in out, out
        snapimg("snapshot", "create", "--control", s.control, "guest@t1")
        out = vm.command(
            'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x32 512k 1M"'
        )
        assert "wrote 1048576/1048576" in out, out
        out = vm.command('qemu-io -d /machine/peripheral/vd0/virtio-backend "write -z 8M 64k"')
        assert "wrote 65536/65536" in out, out
        out = vm.command('qemu-io -d /machine/peripheral/vd0/virtio-backend "read -P 0x32 512k 1M"')
        assert "read 1048576/1048576" in out and "fail" not in out.lower(), out
        vm.command('qemu-io -d /machine/peripheral/vd0/virtio-backend "flush"')
    finally:
        vm.quit()
    # The origin file holds what the VM wrote; the snapshot what was there at create time.
    data = img.read_bytes()
    assert data[: 512 << 10] == b"\x21" * (512 << 10)
    assert data[512 << 10 : 1536 << 10] == b"\x32" * MiB
    assert data[8 * MiB : 8 * MiB + 65536] == bytes(65536)
    qemu_io(s.uri("guest@t1"), "read -P 0x21 0 1M", "read -P 0x10 1M 15M", read_only=True)
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_qemu_tls_client(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    certs = make_certs(tmp_path / "pki")
    img = tmp_path / "tls.img"
    with img.open("wb") as f:
        f.truncate(4 * MiB)
    port = _free_port()
    s = serve([f"tls={img}"], "--tcp", f"127.0.0.1:{port}",
              "--tls-cert", str(certs / "server-cert.pem"),
              "--tls-key", str(certs / "server-key.pem"))  # fmt: skip
    opts = (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
        "export=tls,tls-creds=tls0"
    )
    obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
    run(
        "qemu-io",
        "--object",
        obj,
        "--image-opts",
        opts,
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
    )
    assert img.read_bytes()[:65536] == b"\x5a" * 65536
    info = run("qemu-img", "info", "--object", obj, "--image-opts", opts).stdout
    assert "virtual size: 4 MiB" in info
    # Without TLS the server refuses TCP clients; the 0600 unix socket needs no TLS.
    plain = run("qemu-img", "info", f"nbd://127.0.0.1:{port}/tls", check=False)
    assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
    qemu_io(s.uri("tls"), "read -P 0x5a 0 64k")
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
