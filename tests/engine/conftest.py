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


@pytest.fixture(autouse=True)
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The data path this test runs on (children inherit it through the environment)."""
    param: str | None = getattr(request, "param", None)
    if param is not None:
        monkeypatch.setenv("SNAPIMG_DATAPATH", param)
    return param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every engine test function runs on both data paths; the hypothesis model test,
    a unittest class (no parameters there), has one class per path."""
    if "datapath" in metafunc.fixturenames:
        metafunc.parametrize("datapath", ["compiled", "python"], indirect=True)
