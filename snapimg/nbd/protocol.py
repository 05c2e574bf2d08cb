"""NBD wire constants and structs, named as in the NBD protocol spec (doc/proto.md).

Only what the server speaks: fixed newstyle handshake, the options listed in
docs/nbd.md, simple and structured replies, and the ``base:allocation`` context.
All integers are big-endian (network byte order).
"""

from __future__ import annotations

import errno
import struct

# Handshake magics.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x3E889045565A9  # option reply magic

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

# Option reply types.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REP_ERR_POLICY = (1 << 31) + 2
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_REP_ERR_PLATFORM = (1 << 31) + 4
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6
NBD_REP_ERR_SHUTDOWN = (1 << 31) + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
NBD_REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_INFO_* types (NBD_OPT_INFO / NBD_OPT_GO).
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Transmission: request and reply magics.
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Commands.
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Command flags.
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and types.
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation states.
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# Error values allowed on the wire.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Limits of this server.
MAX_PAYLOAD = 32 << 20  # largest READ/WRITE payload: larger requests get EINVAL
MAX_OPTION_DATA = 64 << 10  # larger option data is refused (NBD_REP_ERR_TOO_BIG)
MAX_STRING = 4096  # spec limit for names and queries
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

# Wire structs.
HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # NBD_REP_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header + offset
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
EXTENT = struct.Struct(">II")  # length, status flags

_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int) -> int:
    """Map a host errno onto one of the error values the spec allows (EIO by default)."""
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


def simple_reply(error: int, handle: int) -> bytes:
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)


def structured_chunk(flags: int, reply_type: int, handle: int, payload: bytes = b"") -> bytes:
    header = STRUCTURED_REPLY.pack(
        NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, len(payload)
    )
    return header + payload


def offset_data_header(handle: int, offset: int, data_length: int) -> bytes:
    """Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk; the data follows it."""
    return OFFSET_DATA_HEADER.pack(
        NBD_STRUCTURED_REPLY_MAGIC,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data_length,
        offset,
    )


def structured_error(handle: int, error: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = ERROR_PAYLOAD.pack(error, len(text)) + text
    return structured_chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, payload)


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(payload)) + payload


COMMAND_NAMES = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}
