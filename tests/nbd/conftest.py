from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nbd.filedev import FileDevice
from tests.nbd.harness import ServerThread, serving

SIZE = 4 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(b"\xaa" * 65536)
    return path


@pytest.fixture
def server(tmp_path: Path, disk: Path) -> Iterator[tuple[ServerThread, dict[str, FileDevice]]]:
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\x55" * (1 << 20))
    devices = {"disk": FileDevice(disk), "disk@ro": FileDevice(ro, read_only=True)}
    with serving(dict(devices), tmp_path / "nbd.sock") as st:
        yield st, devices
    for dev in devices.values():
        dev.close()
