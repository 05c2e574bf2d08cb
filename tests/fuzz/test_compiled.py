"""The C transmission and the compiled data path under the fuzz harness (bench/fuzz.py
runs a million inputs of ``transmission-compiled``).

The extension is built as the harness runs it (reliability/fuzz/sanitized.py: ASan,
UBSan and libFuzzer's coverage, clang-14, a scratch copy of the package).  Short runs of
``transmission-compiled`` and ``lifecycle-compiled`` must pass every oracle with that
build imported; the corpus replays through ``lifecycle-compiled``; and the sanitizers
are shown to be live in that build: two faults planted in a copy of conn.c are each
reported from inside the harness, with the input that hit it kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.fuzz import sanitized, seeds, session, wire
from reliability.fuzz.host import Host
from reliability.fuzz.lifecycle import CYCLE, LifecycleTarget
from snapimg.engine import compiled
from snapimg.nbd import protocol as p

CORPUS = Path(__file__).with_name("corpus") / "transmission"

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason="the C extension snapimg._datapath is not built"
)


def build_or_skip(into: Path, plant: tuple[tuple[str, str, str], ...] = ()) -> Path:
    try:
        return sanitized.build(into, plant)
    except sanitized.BuildError as err:
        if "missing" in str(err):
            pytest.skip(str(err))
        raise


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_or_skip(tmp_path_factory.mktemp("sanitized"))


def transmission_inputs() -> list[bytes]:
    files = sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []
    return [f.read_bytes() for f in files] + list(seeds.transmission().values())


def test_the_build_is_instrumented(build: Path) -> None:
    assert sanitized.instrumentation(build) == []
    assert sanitized.extension(build).is_relative_to(build)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["transmission-compiled", "lifecycle-compiled"])
def test_short_sanitized_run(build: Path, tmp_path: Path, target: str) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    for i, data in enumerate(transmission_inputs()):
        (work / f"in{i}").write_bytes(data)
    r = session.fuzz(target, 1500, [work], tmp_path / "run", env=sanitized.environment(build))
    assert r.ok, f"{r.crashes} {r.sanitizer_reports[:3]} {r.second_client.mismatches[:3]}\n{r.tail}"
    # "Done N runs" counts executions, and libFuzzer may execute an input again (a CI run
    # under load printed 1501 for -runs=1500): at least the runs asked for
    assert r.inputs >= 1500 and r.second_client.ops > 0 and "cov:" in r.coverage
    assert Path(r.extension) == sanitized.extension(build)  # the instrumented one ran


def test_corpus_replays_while_snapshots_come_and_go(tmp_path: Path) -> None:
    host = Host(tmp_path / "host", "compiled")
    try:
        t = LifecycleTarget(host)
        inputs = transmission_inputs() * 2
        for data in inputs:
            t.one_input(data)
        t.turn()  # verifies the last one
        assert t.cycles == len(inputs) // CYCLE + 1
        assert host.snapshot_intact() is None and not host.errors
    finally:
        host.close()


# Deliberate faults, in a copy of conn.c only: a WRITE with FUA gets a payload buffer of
# half its length (a heap overflow when the payload is received), and a command's valid
# flags are looked up before the command is known to be one (an index out of bounds).
# Neither path is taken by the second client (no FUA, known commands).
PLANTED = (
    ("conn.c", "if (r->length > MAX_PAYLOAD || reserve(w, r->length)) {",
     "if (r->length > MAX_PAYLOAD ||\n"
     "        reserve(w, r->flags & NBD_CMD_FLAG_FUA ? r->length / 2 : r->length)) {"),
    ("conn.c", "    if (!known) {\n"
     "        snprintf(msg, mlen, \"unsupported command %d\", cmd);\n"
     "        return EINVAL;\n"
     "    }\n",
     "    int bad_flags = (r->flags & ~valid_flags[cmd]) != 0;\n"
     "    if (!known) {\n"
     "        snprintf(msg, mlen, \"unsupported command %d\", cmd);\n"
     "        return EINVAL;\n"
     "    }\n"
     "    (void)bad_flags;\n"),
)  # fmt: skip


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_or_skip(tmp_path_factory.mktemp("faulty"), PLANTED)


def fuzz_planted(build: Path, tmp_path: Path, stream: bytes) -> str:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "fine").write_bytes(b"\x00" + wire.request(p.NBD_CMD_READ, 1, 0, 512))
    (corpus / "planted").write_bytes(b"\x00" + stream)
    r = session.fuzz("transmission-compiled", 20, [corpus], tmp_path / "run",
                     env=sanitized.environment(build))  # fmt: skip
    log = (tmp_path / "run" / "fuzz.log").read_text(errors="replace")
    assert r.returncode != 0 and r.crashes and r.sanitizer_reports, log[-3000:]
    assert Path(r.crashes[0]).read_bytes() == b"\x00" + stream
    assert "conn.c" in log  # symbolized: the report names the planted line's file
    return log


def test_asan_reports_the_planted_heap_overflow(faulty: Path, tmp_path: Path) -> None:
    write = wire.request(p.NBD_CMD_WRITE, 7, 0, 4096, p.NBD_CMD_FLAG_FUA, bytes(4096))
    log = fuzz_planted(faulty, tmp_path, write)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in log


def test_ubsan_reports_the_planted_index_out_of_bounds(faulty: Path, tmp_path: Path) -> None:
    log = fuzz_planted(faulty, tmp_path, wire.request(200, 8))
    assert "runtime error: index 200 out of bounds" in log
