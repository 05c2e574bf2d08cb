"""Linux guests over SSH: a writer VM, a snapshot taken with no pause, a backup VM that checks it.

Every test boots real Linux guests (Debian's kernel, built by images/linux/build.py) under
qemu-system-x86_64, either directly or as libvirt domains; see docs/linux-guest.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtests import config, controllers
from vmtests.libvirt_driver import Libvirtd
from vmtests.scenarios import linux_backup_vm as scenario

pytestmark = pytest.mark.vm

# CI runs lsi (SCSI) and IDE for both drivers: two boots each (writer VM, backup VM).
# SNAPIMG_LINUX_CONTROLLERS=lsi,ide,ahci,megasas,virtio-scsi widens the matrix.
CONTROLLERS = [c for c in os.environ.get("SNAPIMG_LINUX_CONTROLLERS", "lsi,ide").split(",") if c]
DRIVERS = ["qemu", "libvirt"]


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    settings = config.load()
    if reason := settings.accel_unusable():
        pytest.skip(reason)
    return settings


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    daemon = Libvirtd.ensure()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def log_dir(request: pytest.FixtureRequest, settings: config.Settings) -> Iterator[Path]:
    """Consoles, SSH transcripts, domain XML and QEMU logs of this test; kept on failure."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path = settings.log_dir / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"\nVM logs kept in {path}")


def _report(outcome: scenario.Outcome) -> None:
    print(" ".join(f"{key}={value}" for key, value in sorted(outcome.facts.items())))


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_writer_then_backup_vm(driver: str, controller: str, settings: config.Settings,
                               request: pytest.FixtureRequest, log_dir: Path,
                               tmp_path: Path) -> None:
    ctl = controllers.get(controller)
    if driver == "qemu":
        factory = scenario.qemu_factory(settings, ctl, log_dir)
    else:
        daemon = request.getfixturevalue("libvirtd")
        factory = scenario.libvirt_factory(daemon, ctl, log_dir, f"snapimg-{os.getpid()}")
    outcome = asyncio.run(scenario.writer_and_backup_vm(settings, factory, ctl, tmp_path, log_dir))
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["guest_sha256"] == outcome.facts["host_sha256"]
    assert outcome.facts["files_verified"] == scenario.FILES


def test_libvirt_pull_backup_verified_by_backup_vm(settings: config.Settings,
                                                   libvirtd: Libvirtd, log_dir: Path,
                                                   tmp_path: Path) -> None:
    outcome = asyncio.run(scenario.libvirt_pull_backup(
        settings, libvirtd, controllers.get("lsi"), tmp_path, log_dir, f"snapimg-{os.getpid()}"))
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["guest_sha256"] == outcome.facts["host_sha256"]
