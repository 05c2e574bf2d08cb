"""One NBD request against a block device, start to finish: check, execute, encode reply.

:func:`serve_request` is synchronous (it calls the device) and never raises for a
refused request: errors become NBD error replies.  Both transmission loops use it.
"""

from __future__ import annotations

import errno
import logging
from typing import NamedTuple

from snapimg.blockdev import BlockDevice, Extent
from snapimg.errors import DeviceError, SnapimgError
from snapimg.nbd import protocol as p

log = logging.getLogger(__name__)

_VALID_FLAGS = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_REQ_ONE,
}
_WRITES = (p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES)
_RANGED = (p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS, *_WRITES)
CONTEXT_ID = 1  # the id NBD_OPT_SET_META_CONTEXT gives base:allocation

Buffers = list[bytes | bytearray | memoryview]


class Request(NamedTuple):
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int


class RequestError(Exception):
    """Refuse one request with an NBD error value; the connection carries on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Context(NamedTuple):
    """What the requests of one connection share."""

    dev: BlockDevice
    structured: bool
    base_allocation: bool


def parse_header(header: bytes) -> Request | None:
    """The request in one request header (:data:`~snapimg.nbd.protocol.REQUEST`); None
    when the transmission ends here: NBD_CMD_DISC, or a bad magic (logged)."""
    magic, *fields = p.REQUEST.unpack(header)
    if magic != p.NBD_REQUEST_MAGIC:
        log.warning("bad request magic %#x: disconnecting", magic)
        return None
    req = Request(*fields)
    return None if req.cmd == p.NBD_CMD_DISC else req


def refuse_payload(ctx: Context, req: Request) -> Buffers | None:
    """The error reply to a write whose payload is over
    :data:`~snapimg.nbd.protocol.MAX_PAYLOAD` (the caller skips the payload and carries
    on); None for every other request."""
    if req.cmd == p.NBD_CMD_WRITE and req.length > p.MAX_PAYLOAD:
        return error_reply(ctx.structured, req, p.NBD_EINVAL, "payload over 32 MiB")
    return None


def serve_request(ctx: Context, req: Request, payload: bytes | bytearray | None) -> Buffers:
    """Execute ``req`` on the device; return the reply as buffers to send in order."""
    try:
        check(ctx, req)
        return _execute(ctx, req, payload)
    except RequestError as err:
        return error_reply(ctx.structured, req, err.error, str(err))
    except Exception as err:
        error, message = describe_error(err)
        return error_reply(ctx.structured, req, p.nbd_error(error), message)


def describe_error(err: BaseException) -> tuple[int, str]:
    """The errno and message with which a request that raised ``err`` is refused."""
    if isinstance(err, DeviceError):
        return err.errno, str(err)
    if isinstance(err, OSError):
        return err.errno or errno.EIO, str(err)
    if isinstance(err, SnapimgError):  # e.g. the snapshot was dropped under this request
        return errno.EIO, str(err)
    # a bug: report EIO to this request, keep serving
    log.error("request failed", exc_info=err)
    return errno.EIO, f"internal error: {err}"


def check(ctx: Context, req: Request) -> None:
    dev, cmd, flags = ctx.dev, req.cmd, req.flags
    valid = _VALID_FLAGS.get(cmd)
    if valid is None:
        raise RequestError(p.NBD_EINVAL, f"unsupported command {cmd}")
    if flags & ~valid or (flags & p.NBD_CMD_FLAG_DF and not ctx.structured):
        raise RequestError(p.NBD_EINVAL, f"bad flags {flags:#x}")
    if cmd in _WRITES and dev.read_only:
        raise RequestError(p.NBD_EPERM, "export is read-only")
    if cmd in _RANGED and req.offset + req.length > dev.size:
        raise RequestError(p.NBD_EINVAL, "request beyond the end of the export")
    if cmd in (p.NBD_CMD_READ, p.NBD_CMD_WRITE) and req.length > p.MAX_PAYLOAD:
        raise RequestError(p.NBD_EINVAL, "payload over 32 MiB")
    if cmd == p.NBD_CMD_TRIM and not dev.can_trim:
        raise RequestError(p.NBD_EINVAL, "trim not supported on this export")
    if cmd == p.NBD_CMD_BLOCK_STATUS and (not ctx.base_allocation or req.length == 0):
        raise RequestError(p.NBD_EINVAL, "no metadata context negotiated or empty range")


def _execute(ctx: Context, req: Request, payload: bytes | bytearray | None) -> Buffers:
    dev, cmd, offset, length = ctx.dev, req.cmd, req.offset, req.length
    fua = bool(req.flags & p.NBD_CMD_FLAG_FUA)
    if cmd == p.NBD_CMD_READ:
        data = dev.pread(offset, length) if length else b""
        if len(data) != length:
            raise RequestError(p.NBD_EIO, "short read")
        return data_reply(ctx.structured, req, data)
    if cmd == p.NBD_CMD_BLOCK_STATUS:
        extents = dev.block_status(offset, length)
        one = bool(req.flags & p.NBD_CMD_FLAG_REQ_ONE)
        return [extents_reply(req, extents, one)]
    if cmd == p.NBD_CMD_WRITE:
        assert payload is not None
        dev.pwrite(offset, payload if isinstance(payload, bytes) else memoryview(payload), fua)
    elif cmd == p.NBD_CMD_FLUSH:
        dev.flush()
    elif cmd == p.NBD_CMD_TRIM and length:
        dev.trim(offset, length)
        if fua:
            dev.flush()
    elif cmd == p.NBD_CMD_WRITE_ZEROES and length:
        dev.write_zeroes(offset, length, fua, not req.flags & p.NBD_CMD_FLAG_NO_HOLE)
    return [ok_reply(ctx.structured, req)]


def ok_reply(structured: bool, req: Request) -> bytes:
    if structured:
        return p.structured_chunk(p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_NONE, req.handle)
    return p.simple_reply(0, req.handle)


def data_reply(structured: bool, req: Request, data: bytes) -> Buffers:
    if not structured:
        return [p.simple_reply(0, req.handle), data]
    if not data:
        return [ok_reply(True, req)]
    return [p.offset_data_header(req.handle, req.offset, len(data)), data]


def error_reply(structured: bool, req: Request, error: int, message: str) -> Buffers:
    log.debug("%s: error %d: %s", p.COMMAND_NAMES.get(req.cmd, req.cmd), error, message)
    if structured:
        return [p.structured_error(req.handle, error, message)]
    return [p.simple_reply(error, req.handle)]


def extents_reply(req: Request, extents: list[Extent], one: bool) -> bytes:
    descriptors: list[list[int]] = []
    total = 0
    for ext in extents:
        n = min(ext.length, req.length - total)
        if n <= 0:
            break
        state = (p.NBD_STATE_HOLE if ext.hole else 0) | (p.NBD_STATE_ZERO if ext.zero else 0)
        if descriptors and descriptors[-1][1] == state:
            descriptors[-1][0] += n
        else:
            descriptors.append([n, state])
        total += n
    if not descriptors:
        raise RequestError(p.NBD_EIO, "device returned no extents")
    if one:
        descriptors = descriptors[:1]
    payload = p.U32.pack(CONTEXT_ID) + b"".join(p.EXTENT.pack(n, s) for n, s in descriptors)
    return p.structured_chunk(
        p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_BLOCK_STATUS, req.handle, payload
    )
