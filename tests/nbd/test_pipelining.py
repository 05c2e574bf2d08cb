"""Many requests in flight on one plain connection (the leader/followers threads of
snapimg/nbd/threaded.py): every request is answered once, by handle, also when more
requests arrive than the connection has threads, and a disconnect waits for them."""

from __future__ import annotations

import socket

from snapimg.nbd import protocol as p
from snapimg.nbd.threaded import THREADS
from tests.nbd.filedev import FileDevice
from tests.nbd.harness import ServerThread
from tests.nbd.test_server import raw_handshake, recv_exact

Server = tuple[ServerThread, dict[str, FileDevice]]
N = 5 * THREADS


def request(cmd: int, handle: int, offset: int, length: int) -> bytes:
    return p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length)


def replies(s: socket.socket, n: int, data_len: int) -> dict[int, bytes]:
    """``n`` simple replies (each with ``data_len`` bytes of data) by handle; all must be OK."""
    out: dict[int, bytes] = {}
    for _ in range(n):
        magic, error, handle = p.SIMPLE_REPLY.unpack(recv_exact(s, p.SIMPLE_REPLY.size))
        assert (magic, error) == (p.NBD_SIMPLE_REPLY_MAGIC, 0)
        assert handle not in out
        out[handle] = recv_exact(s, data_len) if data_len else b""
    return out


def test_pipelined_writes_reads_then_disconnect(server: Server) -> None:
    st, _ = server
    s = raw_handshake(st.sock)
    try:
        patterns = {i: bytes([i]) * 512 for i in range(1, N + 1)}
        s.sendall(
            b"".join(request(p.NBD_CMD_WRITE, i, i * 4096, 512) + patterns[i] for i in patterns)
        )
        assert set(replies(s, N, 0)) == set(patterns)
        # reads and the disconnect in one go: every read is still answered, then EOF
        s.sendall(
            b"".join(request(p.NBD_CMD_READ, i, i * 4096, 512) for i in patterns)
            + request(p.NBD_CMD_DISC, 0, 0, 0)
        )
        assert replies(s, N, 512) == patterns
        assert s.recv(1) == b""
    finally:
        s.close()


def test_more_requests_than_threads_all_stuck_in_the_device(server: Server) -> None:
    st, devs = server
    ro = devs["disk@ro"]
    ro.gate.clear()  # every read of disk@ro blocks in the device
    s = raw_handshake(st.sock, "disk@ro")
    try:
        s.sendall(b"".join(request(p.NBD_CMD_READ, i, i * 512, 512) for i in range(N)))
        s.settimeout(0.5)
        try:
            got = s.recv(1)
        except TimeoutError:
            got = b""
        assert got == b"", "a read was answered while the device was blocked"
        s.settimeout(None)
        ro.gate.set()
        assert replies(s, N, 512) == {i: b"\x55" * 512 for i in range(N)}
    finally:
        ro.gate.set()
        s.close()
