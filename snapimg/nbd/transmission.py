"""The transmission phase of one connection: requests in, replies out, per request.

Every request becomes its own task; the device call runs in the server's thread pool
so a slow device call, or a client that does not read its replies, only holds back
that client.  Replies go out as soon as their request is done (out of order, matched
by handle).  At most ``max_in_flight`` requests per connection are processed at
once; beyond that the connection stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from snapimg.blockdev import BlockDevice, Extent
from snapimg.errors import DeviceError
from snapimg.nbd import protocol as p
from snapimg.nbd.handshake import Session

log = logging.getLogger(__name__)
T = TypeVar("T")

_VALID_FLAGS = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_REQ_ONE,
}
_WRITES = (p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES)
_RANGED = (p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS) + _WRITES
_CONTEXT_ID = 1  # the id NBD_OPT_SET_META_CONTEXT gave base:allocation


class RequestError(Exception):
    """Refuse one request with an NBD error value; the connection carries on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Transmission:
    def __init__(self, session: Session, executor: Executor, max_in_flight: int = 64) -> None:
        assert session.export is not None
        self.s = session
        self.dev: BlockDevice = session.export.device
        self.executor = executor
        self.slots = asyncio.Semaphore(max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve requests until NBD_CMD_DISC or the client goes away; then wait for
        the requests in flight (their device calls complete either way)."""
        r = self.s.reader
        try:
            while True:
                header = await r.readexactly(p.REQUEST.size)
                magic, flags, cmd, handle, offset, length = p.REQUEST.unpack(header)
                if magic != p.NBD_REQUEST_MAGIC:
                    log.warning("bad request magic %#x: disconnecting", magic)
                    return
                if cmd == p.NBD_CMD_DISC:
                    return
                payload: bytes | None = None
                if cmd == p.NBD_CMD_WRITE:
                    if length > p.MAX_PAYLOAD:
                        await self._discard(length)
                        self._send_error(handle, p.NBD_EINVAL, "payload over 32 MiB", cmd)
                        continue
                    payload = await r.readexactly(length)
                await self.slots.acquire()
                task = self.loop.create_task(
                    self._handle(flags, cmd, handle, offset, length, payload)
                )
                self.tasks.add(task)
                task.add_done_callback(self._done)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def _discard(self, length: int) -> None:
        while length:
            n = min(length, 1 << 20)
            await self.s.reader.readexactly(n)
            length -= n

    async def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        return await self.loop.run_in_executor(self.executor, fn, *args)

    async def _handle(
        self, flags: int, cmd: int, handle: int, offset: int, length: int, payload: bytes | None
    ) -> None:
        try:
            self._check(flags, cmd, offset, length)
            if cmd == p.NBD_CMD_READ:
                data = await self._call(self.dev.pread, offset, length)
                if len(data) != length:
                    raise RequestError(p.NBD_EIO, "short read")
                self._send_data(handle, offset, data)
            elif cmd == p.NBD_CMD_BLOCK_STATUS:
                extents = await self._call(self.dev.block_status, offset, length)
                self._send_extents(handle, extents, length, bool(flags & p.NBD_CMD_FLAG_REQ_ONE))
            else:
                await self._write_like(flags, cmd, offset, length, payload)
                self._send_ok(handle)
        except RequestError as err:
            self._send_error(handle, err.error, str(err), cmd)
        except DeviceError as err:
            self._send_error(handle, p.nbd_error(err.errno), str(err), cmd)
        except OSError as err:
            self._send_error(handle, p.nbd_error(err.errno or 0), str(err), cmd)
        except Exception as err:  # a bug: report EIO to this request, keep serving
            log.exception("%s failed", p.COMMAND_NAMES.get(cmd, cmd))
            self._send_error(handle, p.NBD_EIO, f"internal error: {err}", cmd)
        with contextlib.suppress(ConnectionError):
            await self.s.writer.drain()

    def _check(self, flags: int, cmd: int, offset: int, length: int) -> None:
        valid = _VALID_FLAGS.get(cmd)
        if valid is None:
            raise RequestError(p.NBD_EINVAL, f"unsupported command {cmd}")
        if flags & ~valid or (flags & p.NBD_CMD_FLAG_DF and not self.s.structured):
            raise RequestError(p.NBD_EINVAL, f"bad flags {flags:#x}")
        if cmd in _WRITES and self.dev.read_only:
            raise RequestError(p.NBD_EPERM, "export is read-only")
        if cmd in _RANGED and offset + length > self.dev.size:
            raise RequestError(p.NBD_EINVAL, "request beyond the end of the export")
        if cmd == p.NBD_CMD_READ and length > p.MAX_PAYLOAD:
            raise RequestError(p.NBD_EINVAL, "read over 32 MiB")
        if cmd == p.NBD_CMD_TRIM and not self.dev.can_trim:
            raise RequestError(p.NBD_EINVAL, "trim not supported on this export")
        if cmd == p.NBD_CMD_BLOCK_STATUS and (not self.s.base_allocation or length == 0):
            raise RequestError(p.NBD_EINVAL, "no metadata context negotiated or empty range")

    async def _write_like(
        self, flags: int, cmd: int, offset: int, length: int, payload: bytes | None
    ) -> None:
        fua = bool(flags & p.NBD_CMD_FLAG_FUA)
        dev = self.dev
        if cmd == p.NBD_CMD_WRITE:
            assert payload is not None
            await self._call(dev.pwrite, offset, payload, fua)
        elif cmd == p.NBD_CMD_FLUSH:
            await self._call(dev.flush)
        elif cmd == p.NBD_CMD_TRIM:
            if length:
                await self._call(dev.trim, offset, length)
                if fua:
                    await self._call(dev.flush)
        elif cmd == p.NBD_CMD_WRITE_ZEROES and length:
            may_trim = not flags & p.NBD_CMD_FLAG_NO_HOLE
            await self._call(dev.write_zeroes, offset, length, fua, may_trim)

    # Replies: every send is one uninterrupted write (no await in between).

    def _send_ok(self, handle: int) -> None:
        if self.s.structured:
            self.s.writer.write(
                p.structured_chunk(p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_NONE, handle)
            )
        else:
            self.s.writer.write(p.simple_reply(0, handle))

    def _send_data(self, handle: int, offset: int, data: bytes) -> None:
        w = self.s.writer
        if self.s.structured:
            if not data:
                self._send_ok(handle)
                return
            w.write(p.offset_data_header(handle, offset, len(data)))
        else:
            w.write(p.simple_reply(0, handle))
        w.write(data)

    def _send_error(self, handle: int, error: int, message: str, cmd: int) -> None:
        log.debug("%s: error %d: %s", p.COMMAND_NAMES.get(cmd, cmd), error, message)
        if self.s.structured:
            self.s.writer.write(p.structured_error(handle, error, message))
        else:
            self.s.writer.write(p.simple_reply(error, handle))

    def _send_extents(self, handle: int, extents: list[Extent], length: int, one: bool) -> None:
        descriptors: list[list[int]] = []
        total = 0
        for ext in extents:
            n = min(ext.length, length - total)
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
        payload = p.U32.pack(_CONTEXT_ID) + b"".join(p.EXTENT.pack(n, st) for n, st in descriptors)
        self.s.writer.write(
            p.structured_chunk(
                p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_BLOCK_STATUS, handle, payload
            )
        )
