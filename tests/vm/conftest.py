"""Fixtures of the VM tests: rig settings, and per-test log directories kept on failure."""

from __future__ import annotations

import re
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmtests import config
from vmtests.libvirt_driver import Libvirtd


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def rig_settings() -> config.Settings:
    """The rig's settings; the test is skipped when the asked-for accelerator is unusable."""
    settings = config.load()
    if reason := settings.accel_unusable():
        pytest.skip(reason)
    return settings


@pytest.fixture(scope="session")
def vm_settings(rig_settings: config.Settings) -> config.Settings:
    """Settings of the FreeDOS tests: skipped without a FreeDOS image."""
    settings = rig_settings
    if not settings.freedos_image.is_file():
        pytest.skip(
            f"FreeDOS image not found at {settings.freedos_image} "
            "(set SNAPIMG_FREEDOS_IMAGE; see docs/vmtests.md)"
        )
    return settings


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """The system libvirtd (started for the test module if none runs, stopped after it)."""
    daemon = Libvirtd.ensure()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def vm_log_dir(request: pytest.FixtureRequest, rig_settings: config.Settings) -> Iterator[Path]:
    """Serial consoles, SSH transcripts and QEMU/snapimg logs of this test; removed only if
    the test passed."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    log_dir = rig_settings.log_dir / name
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    yield log_dir
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f"\nVM logs kept in {log_dir}")
