"""The client's side of the NBD wire for fuzzing: encoding options and requests, and
checking what a server answered to a byte stream it was sent.

:func:`check_handshake` and :func:`check_transmission` walk the client's stream the way
the server reads it and the server's answer in step; they raise :class:`WireError` when
the answer is malformed, answers the wrong option or request, misses one, or carries
data a known device cannot hold.  Names follow the NBD protocol spec (doc/proto.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from snapimg.nbd import protocol as p


class WireError(AssertionError):
    """The server's answer breaks the protocol."""


def option(opt: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> bytes:
    return p.OPTION_HEADER.pack(magic, opt, len(data)) + data


def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        p.U32.pack(len(raw))
        + raw
        + p.U16.pack(len(requests))
        + b"".join(p.U16.pack(r) for r in requests)
    )


def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    out = p.U32.pack(len(raw)) + raw + p.U32.pack(len(queries))
    for q in queries:
        out += p.U32.pack(len(q.encode())) + q.encode()
    return out


def request(cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:  # fmt: skip
    return p.REQUEST.pack(p.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes | None:
        if self.pos + n > len(self.buf):
            return None
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def need(self, n: int, what: str) -> bytes:
        got = self.take(n)
        if got is None:
            raise WireError(f"server output ends inside {what}")
        return got


_OPTION_FINAL = {p.NBD_REP_ACK} | {
    p.NBD_REP_ERR_UNSUP, p.NBD_REP_ERR_POLICY, p.NBD_REP_ERR_INVALID, p.NBD_REP_ERR_PLATFORM,
    p.NBD_REP_ERR_TLS_REQD, p.NBD_REP_ERR_UNKNOWN, p.NBD_REP_ERR_SHUTDOWN,
    p.NBD_REP_ERR_BLOCK_SIZE_REQD, p.NBD_REP_ERR_TOO_BIG,
}  # fmt: skip
_OPTION_PARTIAL = {p.NBD_REP_SERVER, p.NBD_REP_INFO, p.NBD_REP_META_CONTEXT}


@dataclass
class HandshakeResult:
    options: int  # options the server answered
    chose: str | None  # the export name transmission would start on, if any
    tls_started: bool


def check_handshake(sent: bytes, got: bytes, sizes: dict[str, int]) -> HandshakeResult:
    """Check the server's answer ``got`` to the client stream ``sent`` (an export table
    of ``sizes``, by name in the order they were added)."""
    out = _Reader(got)
    greeting = out.need(p.HANDSHAKE.size, "the greeting")
    magic, ihaveopt, flags = p.HANDSHAKE.unpack(greeting)
    if (magic, ihaveopt) != (p.NBDMAGIC, p.IHAVEOPT) or flags & ~3:
        raise WireError(f"bad greeting {greeting.hex()}")
    inp = _Reader(sent)
    cflags_raw = inp.take(4)
    result = HandshakeResult(0, None, False)
    no_zeroes = cflags_raw is not None and bool(struct.unpack(">I", cflags_raw)[0] & 2)
    while cflags_raw is not None:
        head = inp.take(p.OPTION_HEADER.size)
        if head is None:
            break
        _, opt, length = p.OPTION_HEADER.unpack(head)
        data = inp.take(length) if length <= 16 * p.MAX_OPTION_DATA else None
        if data is None or not out.left():
            break
        if opt == p.NBD_OPT_EXPORT_NAME and not _is_option_reply(out):
            reply = out.need(p.EXPORT_NAME_REPLY.size, "the NBD_OPT_EXPORT_NAME reply")
            size, _ = p.EXPORT_NAME_REPLY.unpack(reply)
            name = data.decode("utf-8", "replace")
            chosen = name if name else next(iter(sizes), "")
            if sizes.get(chosen) != size:
                raise WireError(f"NBD_OPT_EXPORT_NAME {name!r}: size {size}")
            if not no_zeroes and out.need(124, "the zero padding") != bytes(124):
                raise WireError("NBD_OPT_EXPORT_NAME padding is not zero")
            result.chose = chosen
            break
        final = _option_replies(out, opt, sizes)
        result.options += 1
        if final == p.NBD_REP_ACK and opt == p.NBD_OPT_GO:
            result.chose = _go_name(data, sizes)
            break
        if final == p.NBD_REP_ACK and opt == p.NBD_OPT_STARTTLS:
            result.tls_started = True
            return result  # what follows is TLS
        if final == p.NBD_REP_ACK and opt == p.NBD_OPT_ABORT:
            break
    if out.left():
        raise WireError(f"{out.left()} bytes of server output after the handshake ended")
    return result


def _is_option_reply(out: _Reader) -> bool:
    return out.buf[out.pos : out.pos + 8] == struct.pack(">Q", p.NBD_REP_MAGIC)


def _option_replies(out: _Reader, opt: int, sizes: dict[str, int]) -> int:
    """Consume the replies to option ``opt``; returns the final reply's type."""
    while True:
        head = out.need(p.OPTION_REPLY.size, f"a reply to option {opt}")
        magic, echoed, rtype, length = p.OPTION_REPLY.unpack(head)
        if magic != p.NBD_REP_MAGIC or echoed != opt:
            raise WireError(f"reply {head.hex()} to option {opt}")
        payload = out.need(length, f"the payload of a reply to option {opt}")
        if rtype in _OPTION_FINAL:
            if rtype == p.NBD_REP_ACK and payload:
                raise WireError(f"NBD_REP_ACK to option {opt} with a payload")
            return int(rtype)
        if rtype not in _OPTION_PARTIAL:
            raise WireError(f"unknown reply type {rtype:#x} to option {opt}")
        if rtype == p.NBD_REP_INFO and len(payload) >= 2:
            (info,) = p.U16.unpack_from(payload)
            if info == p.NBD_INFO_EXPORT:
                _, size, _ = p.INFO_EXPORT.unpack(payload)
                if size not in sizes.values():
                    raise WireError(f"NBD_INFO_EXPORT size {size} of no export")


def _go_name(data: bytes, sizes: dict[str, int]) -> str:
    (n,) = struct.unpack_from(">I", data)
    name = data[4 : 4 + n].decode()
    return name if name else next(iter(sizes), "")


@dataclass
class Sent:
    cmd: int
    flags: int
    offset: int
    length: int


def parse_requests(sent: bytes) -> list[tuple[int, Sent]]:
    """The requests a server reads from ``sent`` and must answer, as (handle, request):
    up to a bad magic, NBD_CMD_DISC or the end of the stream (an incomplete request or
    payload is not answered; a WRITE over 32 MiB is answered EINVAL after its payload)."""
    inp = _Reader(sent)
    out: list[tuple[int, Sent]] = []
    while True:
        head = inp.take(p.REQUEST.size)
        if head is None:
            return out
        magic, flags, cmd, handle, offset, length = p.REQUEST.unpack(head)
        if magic != p.NBD_REQUEST_MAGIC or cmd == p.NBD_CMD_DISC:
            return out
        if cmd == p.NBD_CMD_WRITE and inp.take(length) is None:
            return out
        out.append((handle, Sent(cmd, flags, offset, length)))


ReadCheck = Callable[[int, bytes], str | None]  # (offset, data) -> complaint


def check_transmission(
    sent: bytes, got: bytes, structured: bool, read_check: ReadCheck | None = None
) -> int:
    """Check the replies ``got`` to the request stream ``sent``; returns how many were
    matched to their request.  Replies may come in any order; each request gets one."""
    pending: dict[int, list[Sent]] = {}
    for handle, req in parse_requests(sent):
        pending.setdefault(handle, []).append(req)
    expected = sum(len(v) for v in pending.values())
    out = _Reader(got)
    matched = 0
    while out.left():
        (magic,) = p.U32.unpack(out.need(4, "a reply magic"))
        out.pos -= 4
        if magic == p.NBD_SIMPLE_REPLY_MAGIC and not structured:
            step = _simple(out, pending, read_check)
        elif magic == p.NBD_STRUCTURED_REPLY_MAGIC and structured:
            step = _structured(out, pending, read_check)
        else:
            raise WireError(f"reply magic {magic:#x} (structured: {structured})")
        if step is None:  # replies to one handle of requests that differ: stop matching
            return matched
        matched += step
    if matched != expected:
        raise WireError(f"{expected} requests, {matched} replies")
    return matched


def _take_pending(pending: dict[int, list[Sent]], handle: int) -> list[Sent]:
    reqs = pending.get(handle)
    if not reqs:
        raise WireError(f"reply with handle {handle:#x} that no request has (left)")
    return reqs


def _simple(
    out: _Reader, pending: dict[int, list[Sent]], read_check: ReadCheck | None
) -> int | None:
    _, error, handle = p.SIMPLE_REPLY.unpack(out.need(p.SIMPLE_REPLY.size, "a simple reply"))
    reqs = _take_pending(pending, handle)
    if error and error not in _NBD_ERRORS:
        raise WireError(f"error value {error} is not one the spec allows")
    if len({(r.cmd == p.NBD_CMD_READ, r.length) for r in reqs}) > 1:
        return None  # which request it answers decides whether data follows: ambiguous
    req = reqs.pop(0)
    if not error and req.cmd == p.NBD_CMD_READ:
        data = out.need(req.length, "read data")
        if read_check and (complaint := read_check(req.offset, data)):
            raise WireError(complaint)
    return 1


_NBD_ERRORS = {p.NBD_EPERM, p.NBD_EIO, p.NBD_ENOMEM, p.NBD_EINVAL, p.NBD_ENOSPC,
               p.NBD_EOVERFLOW, p.NBD_ENOTSUP, p.NBD_ESHUTDOWN}  # fmt: skip


def _structured(
    out: _Reader, pending: dict[int, list[Sent]], read_check: ReadCheck | None
) -> int | None:
    head = out.need(p.STRUCTURED_REPLY.size, "a structured reply chunk")
    _, flags, rtype, handle, length = p.STRUCTURED_REPLY.unpack(head)
    payload = out.need(length, "a structured reply payload")
    reqs = _take_pending(pending, handle)
    if rtype == p.NBD_REPLY_TYPE_OFFSET_DATA:
        (offset,) = struct.unpack_from(">Q", payload)
        reads = [r for r in reqs if r.cmd == p.NBD_CMD_READ]
        if not reads or not any(r.offset <= offset and offset + length - 8 <= r.offset + r.length
                                for r in reads):  # fmt: skip
            raise WireError(f"NBD_REPLY_TYPE_OFFSET_DATA at {offset} outside the read")
        if read_check and (complaint := read_check(offset, payload[8:])):
            raise WireError(complaint)
    elif rtype in (p.NBD_REPLY_TYPE_ERROR, p.NBD_REPLY_TYPE_ERROR_OFFSET):
        error, msg_len = p.ERROR_PAYLOAD.unpack_from(payload)
        if error not in _NBD_ERRORS or p.ERROR_PAYLOAD.size + msg_len > len(payload):
            raise WireError(f"bad NBD_REPLY_TYPE_ERROR payload {payload[:16].hex()}")
    elif rtype == p.NBD_REPLY_TYPE_BLOCK_STATUS:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise WireError(f"NBD_REPLY_TYPE_BLOCK_STATUS of {len(payload)} bytes")
        if not any(r.cmd == p.NBD_CMD_BLOCK_STATUS for r in reqs):
            raise WireError("NBD_REPLY_TYPE_BLOCK_STATUS to no NBD_CMD_BLOCK_STATUS")
        total = sum(p.EXTENT.unpack_from(payload, 4 + 8 * i)[0] for i in range((length - 4) // 8))
        if not any(0 < total <= r.length or r.flags & p.NBD_CMD_FLAG_REQ_ONE for r in reqs):
            raise WireError(f"block status describes {total} bytes")
    elif rtype != p.NBD_REPLY_TYPE_NONE or payload:
        raise WireError(f"structured reply type {rtype} with {len(payload)} bytes")
    if not flags & p.NBD_REPLY_FLAG_DONE:
        return 0
    if len({(r.cmd, r.length) for r in reqs}) > 1:
        return None
    reqs.pop(0)
    return 1
