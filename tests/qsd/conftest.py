from __future__ import annotations

import shutil

import pytest

for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdcopy"):
    if shutil.which(tool) is None:  # pragma: no cover - CI installs them (scripts/install.sh)
        raise RuntimeError(f"{tool} is required by tests/qsd (run scripts/install.sh)")


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tmp dir with a short path: unix socket paths are limited to 107 bytes."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="sq-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
