"""Records of the store's log: what each one says and how it is framed on disk.

Every record is ``u32 length | u8 type | payload | u32 crc32`` (little endian); the
length counts the whole record and the CRC covers everything before it.  The log is
append-only; a checkpoint (the first records after the header) restates the whole state
with the ``*_STATE`` types.  See docs/store-format.md.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from snapimg.errors import StoreFormatError

_FRAME = struct.Struct("<IB")
_CRC = struct.Struct("<I")
MAX_RECORD = 1 << 16


class Kind(IntEnum):
    ORIGIN = 1  # origin identity: id, size, next generation, name, fingerprint
    SNAP = 2  # snapshot create (runtime) or snapshot table row (checkpoint)
    DROP = 3  # snapshot dropped
    INVALIDATE = 4  # snapshot invalid from now on, with time and reason
    COPY = 5  # runtime: a run of origin blocks copied into consecutive slots
    MAP_STATE = 6  # checkpoint: one association entry run, restored as is
    RELEASE = 7  # runtime: a snapshot released a block run (backup reader's trim)
    RELEASED_STATE = 8  # checkpoint: a released run, restored as is
    PRIVATE = 9  # runtime: a writable snapshot's own block run
    PRIVATE_STATE = 10  # checkpoint: a private block run, restored as is


_ORIGIN = struct.Struct("<HQI")
_SNAP = struct.Struct("<HIdqBBBdQ")
_DROP = struct.Struct("<HI")
_INVALIDATE = struct.Struct("<HId")
_RUN = struct.Struct("<HIQIQ")  # origin, gen, block, count, slot
_RANGE = struct.Struct("<HIQI")  # origin, gen, block, count

ON_FULL_CODES = {"invalidate": 0, "block-writes": 1}
ON_FULL_NAMES = {v: k for k, v in ON_FULL_CODES.items()}


# Records of five fields and more are built with keyword arguments only (kw_only).


@dataclass(frozen=True, kw_only=True)
class OriginRec:
    origin: int
    size: int
    next_gen: int
    name: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class SnapRec:
    origin: int
    gen: int
    created: float
    max_size: int | None
    writable: bool
    on_full: str
    valid: bool
    invalid_time: float
    preserved: int
    name: str
    reason: str


@dataclass(frozen=True)
class DropRec:
    """DROP: the snapshot ``gen`` of ``origin`` is dropped."""

    origin: int
    gen: int


@dataclass(frozen=True)
class InvalidateRec:
    origin: int
    gen: int
    time: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class RunRec:
    """COPY / MAP_STATE (gen = the copy's generation) and PRIVATE / PRIVATE_STATE
    (gen = the snapshot): blocks [block, block+count) held in slots [slot, slot+count)."""

    kind: Kind
    origin: int
    gen: int
    block: int
    count: int
    slot: int


@dataclass(frozen=True, kw_only=True)
class RangeRec:
    """RELEASE / RELEASED_STATE: blocks [block, block+count) of snapshot ``gen``."""

    kind: Kind
    origin: int
    gen: int
    block: int
    count: int


Record = OriginRec | SnapRec | DropRec | InvalidateRec | RunRec | RangeRec


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def _frame(kind: Kind, payload: bytes) -> bytes:
    head = _FRAME.pack(_FRAME.size + len(payload) + _CRC.size, kind)
    body = head + payload
    return body + _CRC.pack(zlib.crc32(body))


def encode(rec: Record) -> bytes:
    if isinstance(rec, RunRec):
        return _frame(rec.kind, _RUN.pack(rec.origin, rec.gen, rec.block, rec.count, rec.slot))
    if isinstance(rec, RangeRec):
        return _frame(rec.kind, _RANGE.pack(rec.origin, rec.gen, rec.block, rec.count))
    if isinstance(rec, DropRec):
        return _frame(Kind.DROP, _DROP.pack(rec.origin, rec.gen))
    if isinstance(rec, InvalidateRec):
        return _frame(
            Kind.INVALIDATE, _INVALIDATE.pack(rec.origin, rec.gen, rec.time) + _str(rec.reason)
        )
    if isinstance(rec, SnapRec):
        fixed = _SNAP.pack(
            rec.origin,
            rec.gen,
            rec.created,
            -1 if rec.max_size is None else rec.max_size,
            rec.writable,
            ON_FULL_CODES[rec.on_full],
            rec.valid,
            rec.invalid_time,
            rec.preserved,
        )
        return _frame(Kind.SNAP, fixed + _str(rec.name) + _str(rec.reason))
    fixed = _ORIGIN.pack(rec.origin, rec.size, rec.next_gen)
    return _frame(Kind.ORIGIN, fixed + _str(rec.name) + _str(rec.fingerprint))


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<H", buf, pos)
    pos += 2
    if pos + n > len(buf):
        raise ValueError("string runs past the record")
    return buf[pos : pos + n].decode(), pos + n


def _decode_payload(kind: Kind, p: bytes) -> Record:
    if kind in (Kind.COPY, Kind.MAP_STATE, Kind.PRIVATE, Kind.PRIVATE_STATE):
        o, g, b, c, s = _RUN.unpack(p)
        return RunRec(kind=kind, origin=o, gen=g, block=b, count=c, slot=s)
    if kind in (Kind.RELEASE, Kind.RELEASED_STATE):
        o, g, b, c = _RANGE.unpack(p)
        return RangeRec(kind=kind, origin=o, gen=g, block=b, count=c)
    if kind == Kind.DROP:
        return DropRec(*_DROP.unpack(p))
    if kind == Kind.INVALIDATE:
        o, g, t = _INVALIDATE.unpack_from(p)
        reason, _ = _read_str(p, _INVALIDATE.size)
        return InvalidateRec(origin=o, gen=g, time=t, reason=reason)
    if kind == Kind.SNAP:
        o, g, created, mx, w, of, v, it, pres = _SNAP.unpack_from(p)
        name, pos = _read_str(p, _SNAP.size)
        reason, _ = _read_str(p, pos)
        return SnapRec(
            origin=o,
            gen=g,
            created=created,
            max_size=None if mx < 0 else mx,
            writable=bool(w),
            on_full=ON_FULL_NAMES[of],
            valid=bool(v),
            invalid_time=it,
            preserved=pres,
            name=name,
            reason=reason,
        )
    o, size, ng = _ORIGIN.unpack_from(p)
    name, pos = _read_str(p, _ORIGIN.size)
    fp, _ = _read_str(p, pos)
    return OriginRec(origin=o, size=size, next_gen=ng, name=name, fingerprint=fp)


def decode_at(buf: bytes | memoryview, pos: int) -> tuple[Record, int] | None:
    """The record starting at ``pos`` and the position after it, or None when the bytes
    there are not one whole, intact record (end of log, torn tail or corruption)."""
    if pos + _FRAME.size + _CRC.size > len(buf):
        return None
    length, kind_code = _FRAME.unpack_from(buf, pos)
    if length < _FRAME.size + _CRC.size or length > MAX_RECORD or pos + length > len(buf):
        return None
    end = pos + length
    (crc,) = _CRC.unpack_from(buf, end - _CRC.size)
    body = bytes(buf[pos : end - _CRC.size])
    if zlib.crc32(body) != crc:
        return None
    try:
        kind = Kind(kind_code)
        return _decode_payload(kind, body[_FRAME.size :]), end
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as err:
        raise StoreFormatError(f"store log record at byte {pos} is malformed: {err}") from err
