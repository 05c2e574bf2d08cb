"""TLS on TCP (FORCEDTLS): libnbd with certificate verification; the asyncio transmission."""

from __future__ import annotations

import errno
import ssl
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from snapimg.nbd.exports import ExportTable
from tests.nbd.filedev import FileDevice
from tests.nbd.harness import ServerThread
from tests.nbd.tlscerts import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(tmp_path: Path, disk: Path, certs: Path) -> Iterator[tuple[ServerThread, int, Path]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs / "server-cert.pem"), str(certs / "server-key.pem"))
    exports = ExportTable()
    exports.add("disk", FileDevice(disk))
    st = ServerThread(exports, tmp_path / "plain.sock")
    st.server.tls = ctx
    st.start()
    st.call(st.server.listen_tcp("127.0.0.1", 0))
    yield st, st.server.tcp_ports()[0], certs
    st.stop()


def client(port: int, certs: Path, tls: int, structured: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(tls)
    if tls != nbd.TLS_DISABLE:
        h.set_tls_certificates(str(certs))
    h.set_export_name("disk")
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_tcp("127.0.0.1", str(port))
    return h


@pytest.mark.parametrize("structured", [True, False])
def test_tls_roundtrip_and_errors(
    tls_server: tuple[ServerThread, int, Path], structured: bool
) -> None:
    st, port, certs = tls_server
    h = client(port, certs, nbd.TLS_REQUIRE, structured)
    assert h.get_tls_negotiated()
    assert h.pread(16, 1 << 20) == b"\xaa" * 16
    cookies = [h.aio_pwrite(bytes([i]) * 65536, i * 65536) for i in range(1, 33)]
    for cookie in cookies:  # 32 writes in flight; replies may come in any order
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    assert h.pread(65536, 5 * 65536) == b"\x05" * 65536
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:
        h.pread(8192, (4 << 20) - 4096)
    assert exc.value.args[1] == errno.EINVAL
    if structured:
        seen: list[int] = []
        h.block_status(65536, 0, lambda m, o, e, err: seen.extend(e) or 0)
        assert seen[0] == 65536
    h.flush()
    h.shutdown()
    # the 0600 unix socket of the same server needs no TLS
    p = nbd.NBD()
    p.connect_unix(str(st.sock))
    assert p.pread(4, 5 * 65536) == b"\x05" * 4
    p.shutdown()


def test_plain_tcp_client_is_refused(tls_server: tuple[ServerThread, int, Path]) -> None:
    _, port, certs = tls_server
    with pytest.raises(nbd.Error, match="TLS"):
        client(port, certs, nbd.TLS_DISABLE)
