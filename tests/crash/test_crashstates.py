"""Crash-state exploration of the engine, CI-sized (bench/crashstates.py runs all of it).

Four of the standard workloads (both durability modes, both on_full policies, writable
snapshots, releases, reopening) are recorded at the system-call boundary; every distinct
process-kill and power-loss state is reopened and judged (reliability/crash/check.py).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from reliability.crash import explorer, workload
from reliability.crash.check import KNOWN_ENGINE_FINDINGS

CI_WORKLOADS = (
    "snapshots-strict-block-writes",
    "writable-default-invalidate",
    "releases-strict-invalidate",
    "reopen-default-block-writes",
)


@pytest.fixture(scope="module", params=["compiled", "python"])
def explored(
    request: pytest.FixtureRequest, recorder: Path, tmp_path_factory: pytest.TempPathFactory
) -> explorer.Tally:
    """The CI workloads recorded on each data path (the recording's child process
    inherits $SNAPIMG_DATAPATH): the C path issues its own system calls."""
    base = tmp_path_factory.mktemp(f"crashstates-{request.param}")
    saved = os.environ.get("SNAPIMG_DATAPATH")
    os.environ["SNAPIMG_DATAPATH"] = request.param
    try:
        total = explorer.Tally()
        for wl in workload.standard():
            if wl.name in CI_WORKLOADS:
                rec = explorer.record(wl, base / wl.name, recorder)
                total.add(explorer.explore(rec, random.Random(7), samples=2, omissions=1))
    finally:
        if saved is None:
            del os.environ["SNAPIMG_DATAPATH"]
        else:
            os.environ["SNAPIMG_DATAPATH"] = saved
    return total


def test_crash_states_keep_every_rule(explored: explorer.Tally) -> None:
    assert explored.workloads == len(CI_WORKLOADS)
    assert explored.states >= 800
    unexpected = [str(v) for v in explored.violations if v.rule not in KNOWN_ENGINE_FINDINGS]
    assert unexpected == []


def test_no_known_engine_findings(explored: explorer.Tally) -> None:
    assert [str(v) for v in explored.violations] == []


def test_the_explorer_catches_a_removed_sync_barrier(recorder: Path, tmp_path: Path) -> None:
    """The strict store without its data file's fdatasync: the explorer must object."""
    wl = workload.make("snapshots", "strict", "invalidate", seed=3)
    rec = explorer.record(wl, tmp_path / "mutant", recorder, drop_sync="store.data")
    tally = explorer.explore(rec, random.Random(7), samples=2, omissions=1,
                             stop=lambda v: v.rule not in KNOWN_ENGINE_FINDINGS)  # fmt: skip
    caught = [v for v in tally.violations if v.rule not in KNOWN_ENGINE_FINDINGS]
    assert caught and caught[0].kind == "power"
