"""Running one scenario on one controller: from pytest and from ``python -m vmtests``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from snapimg.errors import UsageError
from vmtests import controllers
from vmtests.config import Settings
from vmtests.scenarios import SCENARIOS
from vmtests.scenarios.common import Result, ServerFactory, open_rig
from vmtests.server import SnapimgServer


def run_scenario(
    name: str,
    controller: str,
    settings: Settings,
    workdir: Path,
    log_dir: Path,
    backend: str = "native",
    server_factory: ServerFactory = SnapimgServer,
) -> Result:
    if name not in SCENARIOS:
        raise UsageError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    ctl = controllers.get(controller)

    async def go() -> Result:
        async with open_rig(settings, ctl, workdir, log_dir, backend, server_factory) as rig:
            return await SCENARIOS[name](rig)

    return asyncio.run(go())
