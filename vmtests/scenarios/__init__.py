"""The FreeDOS scenarios, by name: each ``run(rig) -> Result``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vmtests.scenarios import attach_to_backup_vm, backup_during_writes, snapshot_without_pause
from vmtests.scenarios.common import Result, Rig

Scenario = Callable[[Rig], Awaitable[Result]]

SCENARIOS: dict[str, Scenario] = {
    module.NAME: module.run
    for module in (backup_during_writes, snapshot_without_pause, attach_to_backup_vm)
}
