"""Linux guests over SSH: a writer VM, a snapshot taken with no pause, a backup VM that checks it.

Every test boots real Linux guests (Debian's kernel, built by images/linux/build.py) under
qemu-system-x86_64, either directly or as libvirt domains; see docs/linux-guest.md.
"""

from __future__ import annotations

import asyncio
import os
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


def _report(outcome: scenario.Outcome) -> None:
    print(" ".join(f"{key}={value}" for key, value in sorted(outcome.facts.items())))


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_writer_then_backup_vm(
    driver: str,
    controller: str,
    rig_settings: config.Settings,
    request: pytest.FixtureRequest,
    vm_log_dir: Path,
    tmp_path: Path,
) -> None:
    ctl = controllers.get(controller)
    if driver == "qemu":
        factory = scenario.qemu_factory(rig_settings, ctl, vm_log_dir)
    else:
        daemon = request.getfixturevalue("libvirtd")
        factory = scenario.libvirt_factory(daemon, ctl, vm_log_dir, f"snapimg-{os.getpid()}")
    outcome = asyncio.run(
        scenario.writer_and_backup_vm(rig_settings, factory, ctl, tmp_path, vm_log_dir)
    )
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["guest_sha256"] == outcome.facts["host_sha256"]
    assert outcome.facts["files_verified"] == scenario.FILES


def test_libvirt_pull_backup_verified_by_backup_vm(
    rig_settings: config.Settings, libvirtd: Libvirtd, vm_log_dir: Path, tmp_path: Path
) -> None:
    outcome = asyncio.run(
        scenario.libvirt_pull_backup(
            rig_settings,
            libvirtd,
            controllers.get("lsi"),
            tmp_path,
            vm_log_dir,
            f"snapimg-{os.getpid()}",
        )
    )
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["guest_sha256"] == outcome.facts["host_sha256"]
