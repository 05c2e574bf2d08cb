"""Fixtures shared by several test packages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.serving import Serve


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
