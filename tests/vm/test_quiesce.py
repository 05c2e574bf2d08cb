"""Quiesced snapshots of a writing Linux guest through qemu-guest-agent (issue 13).

See vmtests/scenarios/quiesced_snapshot.py and docs/quiesce.md.  Each quiesced-snapshot case
boots a writer VM and a backup VM; each kill case one writer VM.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmtests import config, controllers
from vmtests.scenarios import linux_backup_vm as linux
from vmtests.scenarios import quiesced_snapshot as scenario

pytestmark = pytest.mark.vm

CONTROLLERS = [c for c in os.environ.get("SNAPIMG_LINUX_CONTROLLERS", "lsi,ide").split(",") if c]
DRIVERS = ["qemu", "libvirt"]


def _factory(
    driver: str,
    controller: controllers.Controller,
    settings: config.Settings,
    request: pytest.FixtureRequest,
    log_dir: Path,
    workdir: Path,
) -> linux.VmFactory:
    if driver == "qemu":
        return linux.qemu_factory(
            settings, controller, log_dir, extra_args=scenario.second_monitor(workdir)
        )
    daemon = request.getfixturevalue("libvirtd")
    return linux.libvirt_factory(daemon, controller, log_dir, f"snapimg-{os.getpid()}")


def _report(outcome: linux.Outcome) -> None:
    print(" ".join(f"{key}={value}" for key, value in sorted(outcome.facts.items())))


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_quiesced_snapshot(
    driver: str,
    controller: str,
    rig_settings: config.Settings,
    request: pytest.FixtureRequest,
    vm_log_dir: Path,
    tmp_path: Path,
) -> None:
    ctl = controllers.get(controller)
    factory = _factory(driver, ctl, rig_settings, request, vm_log_dir, tmp_path)
    outcome = asyncio.run(
        scenario.quiesced_snapshot(rig_settings, factory, ctl, tmp_path, vm_log_dir)
    )
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["quiesced_needs_recovery"] == f"0/{scenario.QUIESCED_SNAPSHOTS}"
    assert outcome.facts["files_verified"] == linux.FILES


@pytest.mark.parametrize("driver", DRIVERS)
def test_killed_between_freeze_and_thaw(
    driver: str,
    rig_settings: config.Settings,
    request: pytest.FixtureRequest,
    vm_log_dir: Path,
    tmp_path: Path,
) -> None:
    ctl = controllers.get("lsi")
    factory = _factory(driver, ctl, rig_settings, request, vm_log_dir, tmp_path)
    outcome = asyncio.run(
        scenario.killed_between_freeze_and_thaw(rig_settings, factory, ctl, tmp_path, vm_log_dir)
    )
    _report(outcome)
    assert outcome.problems == []
    assert outcome.facts["sigkill_exit"] == -9
