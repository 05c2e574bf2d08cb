"""Every parameter of every control method, fuzzed (structure-aware): one clear error line
per bad request, no traceback in the server's log, no half-created snapshot, and the
server keeps serving (its origin still reads and writes over NBD).  Bench-sized runs:
``bench/control_fuzz.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from snapimg.control.server import METHODS
from tests.interop.control_fuzz import Fuzzer
from tests.interop.qemu_tools import qemu_io
from tests.interop.serving import Serve

MiB = 1 << 20


@pytest.mark.parametrize(("backend", "requests"), [("native", 3000), ("qsd", 500)])
def test_control_socket_fuzz(
    tmp_path: Path, serve: Callable[..., Serve], backend: str, requests: int
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5c" * 8 * MiB)
    s = serve([f"d={img}"], "--backend", backend)
    fuzzer = Fuzzer(s.control, "d", seed=1234, store=s.store if backend == "qsd" else None)
    report = fuzzer.run(requests)
    assert report.requests >= requests and report.checks >= requests // 50
    assert report.errors > report.requests // 2 and report.results > 0
    assert "InternalError" not in report.error_types
    # every method and each of its parameters was tried with a bad value
    assert set(METHODS) <= set(fuzzer.tried) and all(
        fuzzer.tried[m] >= {p.name for p in METHODS[m].params} for m in METHODS
    )
    qemu_io(s.uri("d"), "write -P 0x5d 0 64k", "read -P 0x5d 0 64k", "read -P 0x5c 1M 1M")
    assert s.stop() == 143
    log = s.stderr()
    assert "Traceback" not in log and "InternalError" not in log, log
