"""The NBD transmission phase served in C (engine devices on the compiled data path),
against libnbd and raw sockets: the same protocol behaviour as the Python transmission.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from snapimg.engine import Engine
from snapimg.engine.compiled import SnapshotSlowPath, available
from snapimg.errors import DeviceError
from snapimg.nbd import protocol as p
from tests.nbd.harness import ServerThread, many_clients, serving
from tests.nbd.test_server import raw_handshake, recv_exact

BS = 65536
SIZE = 4 << 20
pytestmark = pytest.mark.skipif(
    not available(), reason="the C extension snapimg._datapath is not built"
)


class Rig:
    def __init__(self, st: ServerThread, eng: Engine, disk: Path) -> None:
        self.st = st
        self.eng = eng
        self.disk = disk

    def connect(self, name: str = "disk", structured: bool = True) -> nbd.NBD:
        h = nbd.NBD()
        h.set_export_name(name)
        h.set_request_structured_replies(structured)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(str(self.st.sock))
        return h


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Origin ``disk`` (1 MiB of 0xaa at 1 MiB, holes elsewhere) with a read-only
    snapshot ``disk@s`` and a writable one ``disk@w``, all on the compiled path."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(b"\xaa" * (1 << 20))
    eng = Engine.open(tmp_path / "store", {"disk": disk}, block_size=BS, datapath="compiled")
    eng.create_snapshot("disk", "s")
    eng.create_snapshot("disk", "w", writable=True)
    devices = {
        "disk": eng.origin_device("disk"),
        "disk@s": eng.snapshot_device("disk", "s"),
        "disk@w": eng.snapshot_device("disk", "w"),
    }
    assert all(d.compiled is not None for d in devices.values())
    with serving(dict(devices), tmp_path / "nbd.sock") as st:
        yield Rig(st, eng, disk)
    eng.close()


@pytest.mark.parametrize("structured", [True, False])
def test_roundtrip_and_snapshot_reads(rig: Rig, structured: bool) -> None:
    h = rig.connect(structured=structured)
    s = rig.connect("disk@s", structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.pread(65536, 1 << 20) == b"\xaa" * 65536
    before = s.pread(SIZE, 0)
    h.pwrite(b"hello" * 1000, (1 << 20) - 7, nbd.CMD_FLAG_FUA)  # across blocks, unaligned
    h.pwrite(bytes(range(256)) * 4096, 2 << 20)  # 1 MiB: 16 blocks copied first
    h.zero(4096, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
    h.trim(BS * 2, (3 << 20) + BS)
    h.flush()
    assert h.pread(5000, (1 << 20) - 7) == b"hello" * 1000
    assert h.pread(4096, 3 << 20) == bytes(4096)
    assert s.pread(SIZE, 0) == before  # the snapshot kept everything
    assert s.pread(13, (1 << 20) - 5) == before[(1 << 20) - 5 : (1 << 20) + 8]
    h.shutdown()
    s.shutdown()


def test_errors_carry_nbd_errnos(rig: Rig) -> None:
    h = rig.connect()
    h.set_strict_mode(0)  # let bad requests reach the server
    with pytest.raises(nbd.Error) as exc:
        h.pread(8192, SIZE - 4096)
    assert exc.value.args[1] == errno.EINVAL
    with pytest.raises(nbd.Error) as exc:
        h.pwrite(b"x" * 4096, SIZE - 1)
    assert exc.value.args[1] == errno.EINVAL
    assert h.pread(4, 1 << 20) == b"\xaa" * 4  # the connection is still usable
    s = rig.connect("disk@s")
    s.set_strict_mode(0)
    for call in (
        lambda: s.pwrite(b"x" * 512, 0),
        lambda: s.zero(512, 0),
        lambda: s.trim(512, 0),
    ):
        with pytest.raises(nbd.Error) as exc:
            call()
        assert exc.value.args[1] == errno.EPERM
    s.shutdown()
    w = rig.connect("disk@w")
    w.trim(2 * BS, 0)  # trim on a writable snapshot releases: those blocks read as EIO
    with pytest.raises(nbd.Error) as exc:
        w.pread(512, BS)
    assert exc.value.args[1] == errno.EIO
    assert w.pread(4, 2 * BS) == bytes(4)
    w.shutdown()
    h.shutdown()


def test_writable_snapshot_keeps_its_writes(rig: Rig) -> None:
    h = rig.connect()
    w = rig.connect("disk@w")
    w.pwrite(b"W" * 5000, (1 << 20) - 100)
    w.zero(4096, 0)
    assert w.pread(5000, (1 << 20) - 100) == b"W" * 5000
    assert h.pread(100, (1 << 20) - 100) == bytes(100)  # the origin is untouched
    assert h.pread(4900, 1 << 20) == b"\xaa" * 4900
    h.pwrite(b"o" * BS, 1 << 20)
    assert w.pread(5000, (1 << 20) - 100) == b"W" * 5000
    w.shutdown()
    h.shutdown()


def test_block_status(rig: Rig) -> None:
    h = rig.connect()
    s = rig.connect("disk@s")
    seen: list[int] = []

    def cb(meta: str, offset: int, entries: list[int], err: int) -> int:
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        seen.extend(entries)
        return 0

    h.block_status(2 << 20, 0, cb)
    assert seen == [1 << 20, 3, 1 << 20, 0]  # hole, then data
    seen.clear()
    h.block_status(2 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [1 << 20, 3]
    h.pwrite(b"x" * 512, 0)  # block 0 of the snapshot is now in the store: data
    seen.clear()
    s.block_status(2 * BS, 0, cb)
    assert seen == [BS, 0, BS, 3]
    h.shutdown()
    s.shutdown()


def test_protocol_violations_and_disconnect(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    s = raw_handshake(rig.st.sock)
    n = (32 << 20) + 512
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 7, 0, n))
    s.sendall(bytes(n))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, p.NBD_EINVAL, 7)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 8, 1 << 20, 4))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 8)
    assert recv_exact(s, 4) == b"\xaa" * 4
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, 42, 9, 0, 0))  # unknown command
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (p.NBD_EINVAL, 9)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 1 << 5, p.NBD_CMD_FLUSH, 10, 0, 0))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (p.NBD_EINVAL, 10)  # bad flag
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, p.NBD_CMD_FLAG_DF, p.NBD_CMD_READ, 11, 0, 8))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (p.NBD_EINVAL, 11)  # DF, simple
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_BLOCK_STATUS, 12, 0, 512))
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16))[1:] == (p.NBD_EINVAL, 12)  # no context
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 13, 0, 0))
    assert s.recv(1) == b""
    s.close()
    bad = raw_handshake(rig.st.sock)
    with caplog.at_level(logging.WARNING, logger="snapimg.nbd.compiled"):
        bad.sendall(p.REQUEST.pack(0x12345678, 0, p.NBD_CMD_READ, 1, 0, 4))
        assert bad.recv(1) == b""
    bad.close()
    assert "bad request magic 0x12345678" in caplog.text


def test_replies_out_of_order_and_stalled_clients(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request stuck in a Python slow path (a writable snapshot with a private block
    is read there) holds back only itself: a flush behind it is answered, and a client
    that never reads its replies holds back only its own connection."""
    gate = threading.Event()
    original = SnapshotSlowPath.read

    def stuck_read(self: SnapshotSlowPath, offset: int, length: int) -> bytes:
        gate.wait(30)
        return original(self, offset, length)

    w = rig.connect("disk@w")
    w.pwrite(b"P" * 512, 0)  # disk@w has a private block: its reads go to Python
    w.shutdown()
    monkeypatch.setattr(SnapshotSlowPath, "read", stuck_read)
    try:
        s = raw_handshake(rig.st.sock, "disk@w")
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 512))
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_FLUSH, 2, 0, 0))
        assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 2)
        hog = raw_handshake(rig.st.sock, "disk")
        hog.sendall(
            b"".join(
                p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, i, 0, 1 << 20)
                for i in range(200)
            )
        )
        for _ in range(3):
            h = rig.connect("disk")
            assert h.pread(4, 1 << 20) == b"\xaa" * 4
            h.shutdown()
        hog.close()
    finally:
        gate.set()
    assert p.SIMPLE_REPLY.unpack(recv_exact(s, 16)) == (p.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
    assert recv_exact(s, 512) == b"P" * 512
    s.close()


def test_many_concurrent_clients_and_snapshot_drop(rig: Rig) -> None:
    many_clients(rig.connect)
    s = rig.connect("disk@s")
    assert s.pread(4, 1 << 20) == b"\xaa" * 4
    rig.st.run(rig.st.exports.remove, "disk@s")  # cuts the connection
    rig.eng.drop_snapshot("disk", "s")
    with pytest.raises(nbd.Error):
        s.pread(4, 1 << 20)


def test_closed_engine_refuses_io(rig: Rig) -> None:
    dev = rig.eng.origin_device("disk")
    rig.eng.close()
    with pytest.raises(DeviceError, match="engine is closed"):
        dev.pread(0, 4)
    with pytest.raises(DeviceError, match="engine is closed"):
        dev.pwrite(0, b"x")
