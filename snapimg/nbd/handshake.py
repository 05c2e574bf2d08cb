"""Fixed newstyle handshake: option haggling up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.

:func:`negotiate` returns the chosen export and what was negotiated, or ``None`` when
the client aborted or broke the protocol (the caller then closes the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from snapimg.nbd import protocol as p
from snapimg.nbd.exports import Export, ExportTable


@dataclass
class Session:
    """What option haggling settled for one connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    no_zeroes: bool = False
    structured: bool = False
    tls_active: bool = False
    meta_export: str | None = None  # export whose base:allocation was selected
    export: Export | None = None

    @property
    def base_allocation(self) -> bool:
        return self.export is not None and self.meta_export == self.export.name


class _BadOption(Exception):
    """Reply to the current option with an error and keep haggling."""

    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type


def transmission_flags(export: Export, structured: bool) -> int:
    dev = export.device
    flags = p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_FLUSH
    if dev.read_only:
        flags |= p.NBD_FLAG_READ_ONLY
    else:
        flags |= p.NBD_FLAG_SEND_FUA | p.NBD_FLAG_SEND_WRITE_ZEROES
        if dev.can_trim:
            flags |= p.NBD_FLAG_SEND_TRIM
    if structured:
        flags |= p.NBD_FLAG_SEND_DF
    if dev.can_multi_conn:
        flags |= p.NBD_FLAG_CAN_MULTI_CONN
    return flags


async def negotiate(
    session: Session, exports: ExportTable, tls: ssl.SSLContext | None
) -> Session | None:
    r, w = session.reader, session.writer
    w.write(
        p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES)
    )
    await w.drain()
    (cflags,) = p.CLIENT_FLAGS.unpack(await r.readexactly(4))
    if cflags & ~(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES):
        return None  # the spec: unknown client flags -> drop the connection
    session.no_zeroes = bool(cflags & p.NBD_FLAG_C_NO_ZEROES)
    while True:
        magic, option, length = p.OPTION_HEADER.unpack(await r.readexactly(p.OPTION_HEADER.size))
        if magic != p.IHAVEOPT:
            return None
        if length > p.MAX_OPTION_DATA:
            if option == p.NBD_OPT_EXPORT_NAME or length > 16 * p.MAX_OPTION_DATA:
                return None
            await r.readexactly(length)
            await _reply(w, option, p.NBD_REP_ERR_TOO_BIG, b"option data too long")
            continue
        data = await r.readexactly(length)
        tls_missing = tls is not None and not session.tls_active
        if tls_missing and option not in (p.NBD_OPT_STARTTLS, p.NBD_OPT_ABORT):
            if option == p.NBD_OPT_EXPORT_NAME:
                return None
            await _reply(w, option, p.NBD_REP_ERR_TLS_REQD, b"TLS required")
            continue
        try:
            done = await _option(session, exports, tls, option, data)
        except _BadOption as bad:
            await _reply(w, option, bad.reply_type, str(bad).encode())
            continue
        if done is not None:
            return session if done else None


async def _reply(
    w: asyncio.StreamWriter, option: int, reply_type: int, payload: bytes = b""
) -> None:
    w.write(p.option_reply(option, reply_type, payload))
    await w.drain()


async def _option(
    s: Session, exports: ExportTable, tls: ssl.SSLContext | None, option: int, data: bytes
) -> bool | None:
    """Handle one option: None = keep haggling, True = transmission, False = close."""
    w = s.writer
    if option == p.NBD_OPT_EXPORT_NAME:
        export = exports.get(data.decode("utf-8", "replace"))
        if export is None:
            return False
        s.export = export
        flags = transmission_flags(export, s.structured)
        w.write(p.EXPORT_NAME_REPLY.pack(export.device.size, flags))
        if not s.no_zeroes:
            w.write(bytes(124))
        await w.drain()
        return True
    if option == p.NBD_OPT_ABORT:
        with contextlib.suppress(ConnectionError):
            await _reply(w, option, p.NBD_REP_ACK)
        return False
    if option == p.NBD_OPT_LIST:
        if data:
            raise _BadOption(p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in exports.names():
            raw = name.encode()
            w.write(p.option_reply(option, p.NBD_REP_SERVER, p.U32.pack(len(raw)) + raw))
        await _reply(w, option, p.NBD_REP_ACK)
        return None
    if option == p.NBD_OPT_STARTTLS:
        if tls is None:
            raise _BadOption(p.NBD_REP_ERR_POLICY, "TLS is not configured")
        if data or s.tls_active:
            raise _BadOption(p.NBD_REP_ERR_INVALID, "bad NBD_OPT_STARTTLS")
        await _reply(w, option, p.NBD_REP_ACK)
        await w.start_tls(tls)
        s.tls_active = True
        return None
    if option in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
        return await _info(s, exports, option, data)
    if option == p.NBD_OPT_STRUCTURED_REPLY:
        if data:
            raise _BadOption(p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        s.structured = True
        await _reply(w, option, p.NBD_REP_ACK)
        return None
    if option in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
        await _meta_context(s, exports, option, data)
        return None
    raise _BadOption(p.NBD_REP_ERR_UNSUP, f"option {option} not supported")


class _Cursor:
    """Reads fields of an option's data; any overrun is NBD_REP_ERR_INVALID."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _BadOption(p.NBD_REP_ERR_INVALID, "option data too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int(p.U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(p.U32.unpack(self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        if n > p.MAX_STRING:
            raise _BadOption(p.NBD_REP_ERR_INVALID, "string too long")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadOption(p.NBD_REP_ERR_INVALID, "string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _BadOption(p.NBD_REP_ERR_INVALID, "trailing option data")


def _lookup(exports: ExportTable, name: str) -> Export:
    export = exports.get(name)
    if export is None:
        raise _BadOption(p.NBD_REP_ERR_UNKNOWN, f"unknown export {name!r}")
    return export


async def _info(s: Session, exports: ExportTable, option: int, data: bytes) -> bool | None:
    cur = _Cursor(data)
    name = cur.string()
    requests = [cur.u16() for _ in range(cur.u16())]
    cur.end()
    export = _lookup(exports, name)
    dev = export.device
    w = s.writer
    flags = transmission_flags(export, s.structured)
    w.write(
        p.option_reply(
            option, p.NBD_REP_INFO, p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, dev.size, flags)
        )
    )
    block = p.INFO_BLOCK_SIZE.pack(
        p.NBD_INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD
    )
    w.write(p.option_reply(option, p.NBD_REP_INFO, block))
    if p.NBD_INFO_NAME in requests:
        w.write(
            p.option_reply(
                option, p.NBD_REP_INFO, p.U16.pack(p.NBD_INFO_NAME) + export.name.encode()
            )
        )
    if p.NBD_INFO_DESCRIPTION in requests and export.description:
        payload = p.U16.pack(p.NBD_INFO_DESCRIPTION) + export.description.encode()
        w.write(p.option_reply(option, p.NBD_REP_INFO, payload))
    await _reply(w, option, p.NBD_REP_ACK)
    if option == p.NBD_OPT_GO:
        s.export = export
        return True
    return None


async def _meta_context(s: Session, exports: ExportTable, option: int, data: bytes) -> None:
    if not s.structured:
        raise _BadOption(p.NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
    cur = _Cursor(data)
    name = cur.string()
    queries = [cur.string() for _ in range(cur.u32())]
    cur.end()
    export = _lookup(exports, name)
    listing = option == p.NBD_OPT_LIST_META_CONTEXT
    if listing and not queries:
        selected = True
    else:
        selected = any(
            q in ("base:", p.BASE_ALLOCATION) if listing else q == p.BASE_ALLOCATION
            for q in queries
        )
    if not listing:
        s.meta_export = export.name if selected else None
    if selected:
        context_id = 0 if listing else 1
        payload = p.U32.pack(context_id) + p.BASE_ALLOCATION.encode()
        s.writer.write(p.option_reply(option, p.NBD_REP_META_CONTEXT, payload))
    await _reply(s.writer, option, p.NBD_REP_ACK)
