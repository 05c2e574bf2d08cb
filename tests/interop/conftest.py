from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.serving import Serve

TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "qemu-system-x86_64")


@pytest.fixture(autouse=True, scope="session")
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools (run scripts/install.sh): {', '.join(missing)}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Factory: serve(images, *extra_args) -> Serve; every server is stopped at teardown."""
    started: list[Serve] = []

    def start(images: list[str], *extra: str) -> Serve:
        s = Serve(tmp_path, images, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        s.kill()
