"""C code in the fuzz harness runs under AddressSanitizer and UndefinedBehaviorSanitizer.

A deliberately broken C transmission server (toyserve.c, a test fixture) is built with
clang -fsanitize=address,undefined,fuzzer-no-link, plugged in as ``transmission-toy`` and
fuzzed with atheris' ASan+libFuzzer runtime preloaded, as the compiled transmission path
will be (docs/fuzzing.md): each planted bug must end the run with the sanitizer's report
and the input kept by libFuzzer.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import textwrap
from pathlib import Path

import pytest

from reliability.fuzz import session, wire
from snapimg.nbd import protocol as p

ADAPTER = textwrap.dedent('''
    """Plugs _toyserve into the fuzz harness as a transmission server."""
    import threading
    import _toyserve

    def start(sock, leftover, ctx, on_finish):
        fd = sock.detach()

        def run():
            try:
                _toyserve.serve(fd)
            finally:
                on_finish()

        threading.Thread(target=run, daemon=True).start()
''')


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang is None:
        pytest.skip("clang is missing (scripts/install.sh installs clang-14)")
    out = tmp_path_factory.mktemp("toy")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    source = Path(__file__).with_name("toyserve.c")
    cmd = [clang, "-shared", "-fPIC", "-g", "-O1", "-fsanitize=address,undefined,fuzzer-no-link",
           "-fno-sanitize-recover=undefined", f"-I{sysconfig.get_paths()['include']}",
           str(source), "-o", str(out / f"_toyserve{suffix}")]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a sanitized extension here: {built.stderr.strip()[-300:]}")
    (out / "toyadapter.py").write_text(ADAPTER)
    return out


def fuzz_toy(toy: Path, tmp_path: Path, stream: bytes) -> str:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "fine").write_bytes(b"\x00" + wire.request(p.NBD_CMD_READ, 1, 0, 512))
    (corpus / "planted").write_bytes(b"\x00" + stream)
    env = {**session.sanitizer_env(), "PYTHONPATH": str(toy)}
    r = session.fuzz("transmission-toy", 20, [corpus], tmp_path / "run",
                     servers={"toy": "toyadapter:start"}, env=env)  # fmt: skip
    log = (tmp_path / "run" / "fuzz.log").read_text(errors="replace")
    assert r.returncode != 0 and r.crashes, log[-3000:]
    assert Path(r.crashes[0]).read_bytes() == b"\x00" + stream
    return log


def test_asan_reports_a_heap_overflow(toy: Path, tmp_path: Path) -> None:
    write = wire.request(p.NBD_CMD_WRITE, 7, 0, 0x1337, payload=bytes(0x1337))
    log = fuzz_toy(toy, tmp_path, write)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in log
    assert "toyserve.c" in log  # symbolized: the report names the line


def test_ubsan_reports_a_signed_overflow(toy: Path, tmp_path: Path) -> None:
    read = wire.request(p.NBD_CMD_READ, 8, 0, 512, flags=7)
    log = fuzz_toy(toy, tmp_path, read)
    assert "runtime error: signed integer overflow" in log
