"""Seed inputs: well-formed conversations the fuzzer starts from (tests/fuzz/corpus/ keeps
them together with every input that once found a bug)."""

from __future__ import annotations

from reliability.fuzz import wire
from snapimg.nbd import protocol as p

FLAGS = p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)
PLAIN, TLS = b"\x00", b"\x01"


def handshake() -> dict[str, bytes]:
    o = wire.option
    go = o(p.NBD_OPT_GO, wire.info_data("fuzz", (p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION)))
    meta = wire.meta_data("fuzz@s", (p.BASE_ALLOCATION,))
    return {
        "go": PLAIN + FLAGS + go,
        "haggle": PLAIN + FLAGS + o(p.NBD_OPT_LIST) + o(p.NBD_OPT_INFO, wire.info_data("", ()))
        + o(p.NBD_OPT_STRUCTURED_REPLY) + o(p.NBD_OPT_LIST_META_CONTEXT, wire.meta_data("fuzz", ()))
        + o(p.NBD_OPT_SET_META_CONTEXT, meta) + o(p.NBD_OPT_GO, wire.info_data("fuzz@s", (3,))),
        "export-name": PLAIN + p.U32.pack(1) + o(p.NBD_OPT_EXPORT_NAME, b"fuzz@w"),
        "errors": PLAIN + FLAGS + o(p.NBD_OPT_LIST, b"x") + o(99) + o(p.NBD_OPT_STARTTLS)
        + o(p.NBD_OPT_SET_META_CONTEXT, meta) + o(p.NBD_OPT_INFO, wire.info_data("nope", ()))
        + o(p.NBD_OPT_INFO, b"\x00\x00\x10\x00") + o(p.NBD_OPT_ABORT),
        "too-big": PLAIN + FLAGS + o(p.NBD_OPT_LIST, bytes(70000)) + o(p.NBD_OPT_ABORT),
        "tls-required": TLS + FLAGS + o(p.NBD_OPT_LIST) + o(p.NBD_OPT_STARTTLS) + b"\x16\x03\x01",
        "bad-magic": PLAIN + FLAGS + o(p.NBD_OPT_LIST, magic=0x1234),
    }  # fmt: skip


def transmission() -> dict[str, bytes]:
    r = wire.request
    data = bytes(range(256)) * 16
    mixed = (
        r(p.NBD_CMD_READ, 1, 0, 4096) + r(p.NBD_CMD_WRITE, 2, 65536, 4096, payload=data)
        + r(p.NBD_CMD_FLUSH, 3) + r(p.NBD_CMD_TRIM, 4, 3 * 65536, 65536)
        + r(p.NBD_CMD_WRITE_ZEROES, 5, 100, 5000, p.NBD_CMD_FLAG_NO_HOLE)
        + r(p.NBD_CMD_BLOCK_STATUS, 6, 0, 1 << 20, p.NBD_CMD_FLAG_REQ_ONE)
        + r(p.NBD_CMD_READ, 7, 65000, 1000, p.NBD_CMD_FLAG_DF)
        + r(p.NBD_CMD_WRITE, 8, 500, 300, p.NBD_CMD_FLAG_FUA, bytes(300))
        + r(p.NBD_CMD_CACHE, 9) + r(p.NBD_CMD_READ, 10, (1 << 20) - 10, 20)
        + r(p.NBD_CMD_DISC, 11)
    )  # fmt: skip
    huge = r(p.NBD_CMD_WRITE, 1, 0, 40 << 20) + bytes(64)
    return {
        "simple-origin": b"\x00" + mixed,
        "structured-origin": b"\x0c" + mixed,
        "snapshot-reads": b"\x05" + mixed,
        "writable": b"\x26" + mixed,
        "bad-magic": b"\x00" + r(p.NBD_CMD_READ, 1, 0, 512)[:-4] + b"\xff" * 32,
        "huge-write": b"\x00" + huge,
    }
