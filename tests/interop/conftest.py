from __future__ import annotations

import shutil

import pytest

TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "qemu-system-x86_64")


@pytest.fixture(autouse=True, scope="session")
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools (run scripts/install.sh): {', '.join(missing)}")


@pytest.fixture(autouse=True, params=["compiled", "python"])
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every interop test runs against both data paths of ``snapimg serve``."""
    monkeypatch.setenv("SNAPIMG_DATAPATH", request.param)
    return str(request.param)
