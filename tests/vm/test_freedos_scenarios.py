"""The FreeDOS scenarios of the VM rig, over every controller, against `snapimg serve`.

Each test boots real FreeDOS guests under qemu-system-x86_64 whose hard disk is an origin served
by `snapimg serve` over NBD (see docs/vmtests.md for what each scenario proves).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from vmtests import config
from vmtests.controllers import CONTROLLERS
from vmtests.guests import freedos
from vmtests.runner import run_scenario
from vmtests.scenarios import attach_to_backup_vm

pytestmark = pytest.mark.vm

ALL_CONTROLLERS = list(CONTROLLERS)
QSD_CONTROLLERS = ["ide", "lsi"]  # snapimg serve --backend qsd: scenarios 1 and 3


BACKUP_CASES = [(c, "native") for c in ALL_CONTROLLERS] + [(c, "qsd") for c in QSD_CONTROLLERS]


@pytest.mark.parametrize(("controller", "backend"), BACKUP_CASES)
def test_backup_during_writes(
    controller: str, backend: str, vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    result = run_scenario(
        "backup-during-writes", controller, vm_settings, tmp_path, vm_log_dir, backend
    )
    assert result.facts["copy_sha256"] == result.facts["recorded_sha256"]
    assert result.problems == []


@pytest.mark.parametrize("controller", ALL_CONTROLLERS)
def test_snapshot_without_pause(
    controller: str, vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    result = run_scenario("snapshot-without-pause", controller, vm_settings, tmp_path, vm_log_dir)
    assert result.problems == []


@pytest.mark.parametrize(("controller", "backend"), BACKUP_CASES)
def test_attach_to_backup_vm(
    controller: str, backend: str, vm_settings: config.Settings, vm_log_dir: Path, tmp_path: Path
) -> None:
    result = run_scenario(
        "attach-to-backup-vm", controller, vm_settings, tmp_path, vm_log_dir, backend
    )
    want = {
        name: f"{zlib.crc32(freedos.expected_file(gen, attach_to_backup_vm.FILE_KIB)):08x}"
        for gen in range(attach_to_backup_vm.BEFORE[0], attach_to_backup_vm.BEFORE[1] + 1)
        for name in [freedos.file_name(freedos.file_slot(gen))]
    }
    assert result.facts["guest_sums"] == want
    assert result.problems == []
