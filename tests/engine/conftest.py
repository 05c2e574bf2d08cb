"""Fixtures for the engine tests: real image files in a tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from enginetest_util import BS, make_image


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 10 * BS + 1000)


@pytest.fixture(params=["ram", "file"])
def store_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return None if request.param == "ram" else tmp_path / "store"
