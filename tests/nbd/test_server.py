"""The NBD server against libnbd and raw sockets, over a plain-file device."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from pathlib import Path

import nbd
import pytest

from snapimg.nbd import protocol as p
from tests.nbd.filedev import FileDevice
from tests.nbd.harness import ServerThread, many_clients

Server = tuple[ServerThread, dict[str, FileDevice]]


def connect(st: ServerThread, name: str = "disk", structured: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(str(st.sock))
    return h


def test_list_and_flags(server: Server) -> None:
    st, _ = server
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(str(st.sock))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert names == ["disk", "disk@ro"]
    h.set_export_name("disk@ro")
    h.opt_info()
    assert h.get_size() == 1 << 20
    assert h.is_read_only()
    assert not h.can_trim()
    assert h.get_export_description() == "test export disk@ro"
    h.set_export_name("disk")
    h.opt_go()
    assert h.get_size() == 4 << 20
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_zero() and h.can_trim()
    assert h.can_multi_conn() and h.can_df()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
    h.shutdown()


def test_unknown_export_is_refused(server: Server) -> None:
    st, _ = server
    h = nbd.NBD()
    h.set_export_name("nope")
    with pytest.raises(nbd.Error, match="no export named .nope."):
        h.connect_unix(str(st.sock))


@pytest.mark.parametrize("structured", [True, False])
def test_read_write_roundtrip(server: Server, disk: Path, structured: bool) -> None:
    st, devs = server
    h = connect(st, structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.pread(65536, 1 << 20) == b"\xaa" * 65536
    h.pwrite(b"hello" * 1000, 12345, nbd.CMD_FLAG_FUA)
    assert h.pread(5000, 12345) == b"hello" * 1000
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    h.trim(4096, 8192)
    h.flush()
    assert devs["disk"].calls[-4:] == [
        "write 12345 5000 fua=True",
        "zero 0 4096 may_trim=False",
        "trim 8192 4096",
        "flush",
    ]
    assert disk.read_bytes()[12345:17345] == b"hello" * 1000
    h.shutdown()


def test_block_status(server: Server) -> None:
    st, _ = server
    h = connect(st)
    seen: list[int] = []

    def cb(meta: str, offset: int, entries: list[int], err: int) -> int:
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        seen.extend(entries)
        return 0

    h.block_status(2 << 20, 0, cb)
    # hole (0..1M), data (1M..1M+64K), hole (..2M)
    assert seen == [1 << 20, 3, 65536, 0, (1 << 20) - 65536, 3]
    seen.clear()
    h.block_status(2 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [1 << 20, 3]
    h.shutdown()


def test_errors_carry_nbd_errnos(server: Server) -> None:
    st, _ = server
    h = connect(st, "disk")
    h.set_strict_mode(0)  # let bad requests reach the server
    with pytest.raises(nbd.Error) as exc:
        h.pread(8192, (4 << 20) - 4096)
    assert exc.value.args[1] == errno.EINVAL
    with pytest.raises(nbd.Error) as exc:
        h.pread((32 << 20) + 1, 0)
    assert exc.value.args[1] == errno.EINVAL
    assert h.pread(4, 0) == b"\0" * 4  # the connection is still usable
    ro = connect(st, "disk@ro")
    ro.set_strict_mode(0)
    with pytest.raises(nbd.Error) as exc:
        ro.pwrite(b"x" * 512, 0)
    assert exc.value.args[1] == errno.EPERM
    with pytest.raises(nbd.Error) as exc:
        ro.zero(512, 0)
    assert exc.value.args[1] == errno.EPERM
    assert ro.pread(3, 0) == b"\x55" * 3
    ro.shutdown()
    h.shutdown()


# Raw-socket helpers: the cases libnbd will not produce.


def raw_handshake(sock_path: Path, export: str = "disk") -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    f = s.makefile("rb")
    magic, opt, hflags = p.HANDSHAKE.unpack(f.read(18))
    assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
    assert hflags == p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
    s.sendall(struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, 99, 0))  # unknown option
    magic, opt, rtype, length = p.OPTION_REPLY.unpack(f.read(20))
    assert (opt, rtype) == (99, p.NBD_REP_ERR_UNSUP)
    f.read(length)
    raw = export.encode()
    s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_EXPORT_NAME, len(raw)) + raw)
    size, flags = p.EXPORT_NAME_REPLY.unpack(f.read(10))
    assert flags & p.NBD_FLAG_HAS_FLAGS and size > 0
    s.settimeout(10)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return buf


def test_oversized_write_payload_is_discarded(server: Server) -> None:
    st, _ = server
    s = raw_handshake(st.sock)
    n = (32 << 20) + 512
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 7, 0, n))
    s.sendall(bytes(n))
    magic, error, handle = p.SIMPLE_REPLY.unpack(recv_exact(s, 16))
    assert (magic, error, handle) == (p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 7)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 8, 1 << 20, 4))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 8)
    assert recv_exact(s, 4) == b"\xaa" * 4
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, 42, 9, 0, 0))  # unknown command
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (p.NBD_EINVAL, 9)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 10, 0, 0))
    assert s.recv(1) == b""
    s.close()


def test_bad_request_magic_ends_the_connection(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    st, _ = server
    s = raw_handshake(st.sock)
    with caplog.at_level(logging.WARNING, logger="snapimg.nbd.requests"):
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 1 << 20, 4))
        assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
        assert recv_exact(s, 4) == b"\xaa" * 4
        s.sendall(p.REQUEST.pack(0x12345678, 0, p.NBD_CMD_READ, 2, 0, 4))
        assert s.recv(1) == b""
    s.close()
    assert "bad request magic 0x12345678" in caplog.text


def test_replies_out_of_order_and_stalled_clients(server: Server) -> None:
    st, devs = server
    ro = devs["disk@ro"]
    ro.gate.clear()  # every read of disk@ro now blocks in the device
    try:
        s = raw_handshake(st.sock, "disk@ro")
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 512))
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_FLUSH, 2, 0, 0))
        # the flush is answered while the read is still stuck
        assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 2)
        # a client that asks for lots and never reads its replies
        hog = raw_handshake(st.sock, "disk")
        hog.sendall(
            b"".join(
                p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, i, 0, 1 << 20)
                for i in range(200)
            )
        )
        # other clients are served meanwhile
        for _ in range(3):
            h = connect(st, "disk")
            assert h.pread(4, 1 << 20) == b"\xaa" * 4
            h.shutdown()
        hog.close()
    finally:
        ro.gate.set()
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
    assert recv_exact(s, 512) == b"\x55" * 512
    s.close()


def test_socket_mode_and_stale_socket(tmp_path: Path, disk: Path) -> None:
    from tests.nbd.harness import serving

    dev = FileDevice(disk)
    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening: a leftover
    stale.close()
    with serving({"disk": dev}, sock) as st:
        assert sock.stat().st_mode & 0o777 == 0o600
        h = connect(st)
        assert h.get_size() == 4 << 20
        h.shutdown()
    assert not sock.exists()
    dev.close()


def test_many_concurrent_clients(server: Server) -> None:
    st, _ = server
    many_clients(lambda: connect(st, "disk"))


def test_meta_context_options_and_abort(tmp_path: Path, disk: Path) -> None:
    from tests.nbd.harness import serving

    dev = FileDevice(disk, can_trim=False, multi_conn=False)
    with serving({"solo": dev}, tmp_path / "m.sock") as st:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(str(st.sock))
        contexts: list[str] = []
        h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
        assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
        h.opt_abort()
        assert h.aio_is_closed()
        h = nbd.NBD()
        h.add_meta_context("x-unknown:thing")
        h.connect_unix(str(st.sock))  # the default export: the first one
        assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert not h.can_multi_conn() and not h.can_trim()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as exc:
            h.block_status(4096, 0, lambda *a: 0)
        assert exc.value.args[1] == errno.EINVAL
        assert "command failed" in str(exc.value)  # refused by the server, not by libnbd
        h.shutdown()
    dev.close()
