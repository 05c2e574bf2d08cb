"""Fuzzing the NBD server's handshake and transmission paths (CI-sized; bench/fuzz.py
runs a million inputs per target).  The committed corpus replays as regression tests,
a short coverage-guided run per target must pass with a second client verifying its
data meanwhile, and each oracle is shown to catch what it is there for."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reliability.fuzz import seeds, session, targets, wire
from reliability.fuzz.host import Host
from snapimg.engine import compiled
from snapimg.nbd import protocol as p
from snapimg.nbd.requests import Context

CORPUS = Path(__file__).with_name("corpus")
Finish = Callable[[], None]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Host]]:
    """A host per target's data path (targets.DATAPATHS), made when first asked for."""
    made: dict[str | None, Host] = {}

    def get(target: str) -> Host:
        want = targets.DATAPATHS.get(target)
        if want == "compiled" and not compiled.available():
            pytest.skip("the C extension snapimg._datapath is not built")
        if want not in made:
            made[want] = Host(tmp_path_factory.mktemp("fuzzhost"), want)
        return made[want]

    yield get
    for h in made.values():
        h.close()


@pytest.fixture
def host(hosts: Callable[[str], Host]) -> Host:
    return hosts("")


def corpus(kind: str) -> list[bytes]:
    files = sorted((CORPUS / kind).iterdir()) if (CORPUS / kind).is_dir() else []
    made = seeds.handshake() if kind == "handshake" else seeds.transmission()
    return [f.read_bytes() for f in files] + list(made.values())


@pytest.mark.parametrize("target", ["handshake", "transmission-python", "transmission-asyncio",
                                    "transmission-compiled"])  # fmt: skip
def test_corpus_replays(hosts: Callable[[str], Host], target: str) -> None:
    host = hosts(target)
    t = targets.make_target(target, host)
    inputs = corpus("handshake" if target == "handshake" else "transmission")
    for data in inputs:
        t.one_input(data)
    assert t.inputs == len(inputs) > 5
    assert host.snapshot_intact() is None


@pytest.mark.slow
@pytest.mark.parametrize("target", ["handshake", "transmission-python", "transmission-asyncio"])
def test_short_fuzz_run(tmp_path: Path, target: str) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    kind = "handshake" if target == "handshake" else "transmission"
    for i, data in enumerate(corpus(kind)):
        (work / f"in{i}").write_bytes(data)
    r = session.fuzz(target, 1500, [work], tmp_path / "run")
    assert r.ok, f"{r.crashes} {r.second_client.mismatches[:3]} {r.final_check}\n{r.tail}"
    # at least the runs asked for: libFuzzer may execute an input again (test_compiled.py)
    assert r.inputs >= 1500 and r.second_client.ops > 0 and "cov:" in r.coverage


class _Corrupting:
    """A device that returns one wrong byte on reads: what the read oracle must catch."""

    def __init__(self, dev: object) -> None:
        self._dev = dev

    def __getattr__(self, name: str) -> object:
        return getattr(self._dev, name)

    def pread(self, offset: int, length: int) -> bytes:
        data = bytearray(self._dev.pread(offset, length))  # type: ignore[attr-defined]
        if data:
            data[0] ^= 1
        return bytes(data)


def _server(name: str, start: targets.StartServer) -> Callable[[], None]:
    targets.TRANSMISSION_SERVERS[name] = start
    return lambda: targets.TRANSMISSION_SERVERS.pop(name)


def test_oracles_catch_a_wrong_read_a_hang_and_a_logged_error(host: Host) -> None:
    def corrupting(sock: socket.socket, left: bytes, ctx: Context, fin: Finish) -> None:
        wrong = ctx._replace(dev=_Corrupting(ctx.dev))
        targets.python_transmission(sock, left, wrong, fin)

    def silent(sock: socket.socket, left: bytes, ctx: Context, fin: Finish) -> None:
        pass  # holds the connection open, answers nothing

    def logging_error(sock: socket.socket, left: bytes, ctx: Context, fin: Finish) -> None:
        logging.getLogger("snapimg.nbd.threaded").error("failed", exc_info=ValueError("x"))
        targets.python_transmission(sock, left, ctx, fin)

    undo = [_server("corrupting", corrupting), _server("silent", silent),
            _server("logging", logging_error)]  # fmt: skip
    reads = seeds.transmission()["snapshot-reads"]
    try:
        with pytest.raises(wire.WireError, match="fuzz@s read at 0"):
            targets.make_target("transmission-corrupting", host).one_input(reads)
        with pytest.raises(targets.FuzzFailure, match="no end of the connection"):
            targets.make_target("transmission-silent", host).one_input(reads)
        with pytest.raises(targets.FuzzFailure, match="the server logged"):
            targets.make_target("transmission-logging", host).one_input(reads)
    finally:
        for u in undo:
            u()
        host.log.records.clear()


def test_reply_matching_stops_where_a_reused_handle_makes_it_ambiguous() -> None:
    """Found by the fuzzer (corpus/transmission/crash-34ef0e6f...): a READ and a WRITE
    with one handle, the WRITE's error reply first; crediting it to the READ made the
    READ's data look like a malformed reply."""
    sent = wire.request(p.NBD_CMD_READ, 1, 0, 8) + wire.request(
        p.NBD_CMD_WRITE, 1, 1 << 40, 2, payload=b"xy"
    )
    got = p.simple_reply(p.NBD_EINVAL, 1) + p.simple_reply(0, 1) + b"8 bytes!"
    assert wire.check_transmission(sent, got, structured=False) == 0
    unique = sent[:8] + (2).to_bytes(8, "big") + sent[16:]  # the READ with handle 2
    got = p.simple_reply(p.NBD_EINVAL, 1) + p.simple_reply(0, 2) + b"8 bytes!"
    assert wire.check_transmission(unique, got, structured=False) == 2


def test_oracles_catch_malformed_answers(host: Host) -> None:
    sent = seeds.transmission()["simple-origin"][1:]
    some = b"".join(p.simple_reply(0, h) for h in (2, 3, 4, 5, 6))
    with pytest.raises(wire.WireError, match="requests, 5 replies"):
        wire.check_transmission(sent, some, structured=False)
    with pytest.raises(wire.WireError, match="no request has"):
        wire.check_transmission(sent, p.simple_reply(0, 99), structured=False)
    go = seeds.handshake()["go"][1:]
    greeting = p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT, 3)
    wrong_echo = p.option_reply(p.NBD_OPT_LIST, p.NBD_REP_ACK)
    with pytest.raises(wire.WireError, match="to option 7"):
        wire.check_handshake(go, greeting + wrong_echo, host.sizes)
