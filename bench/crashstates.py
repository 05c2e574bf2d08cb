#!/usr/bin/env python3
"""Power-loss crash-state exploration of the engine (docs/crash-states.md).

Runs the standard workloads (6 scenarios x both durability modes x both on_full
policies) under the system-call recorder, checks every distinct kill and power-loss
state of each, then re-runs the strict workloads with the store data file's fsync and
fdatasync removed (the recorder skips them: the engine itself is unchanged) and reports
whether the explorer then finds a violation of a rule the unmutated run kept.

Prints {"workloads": W, "states": N, "violations": V, "mutant_caught": true|false} with
--json; per-rule counts, an example per rule and timings go to stderr.
Usage: bench/crashstates.py [--json] [--samples 8] [--omissions 4] [--seed 1]
       [--only SUBSTRING] [--no-mutant] [--dump DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from reliability.crash import explorer, recording, workload
from reliability.crash.check import KNOWN_ENGINE_FINDINGS

MUTANT_SYNC = "store.data"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, base: Path, lib: Path) -> dict[str, object]:
    wls = [w for w in workload.standard(args.seed) if args.only in w.name]
    total = explorer.Tally()
    recs: dict[str, explorer.Recorded] = {}
    started = time.monotonic()
    for wl in wls:
        t0 = time.monotonic()
        rec = explorer.record(wl, base / wl.name, lib)
        recs[wl.name] = rec
        tally = explorer.explore(rec, random.Random(args.seed), args.samples, args.omissions)
        total.add(tally)
        say(f"{wl.name}: {len(wl.steps)} steps, {len(rec.timeline.events)} recorded calls, "
            f"{tally.states} states, {len(tally.violations)} violations, "
            f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    say(f"baseline: {total.states} states in {time.monotonic() - started:.0f} s; "
        f"violations by rule: {total.rules() or 'none'}")  # fmt: skip
    for rule, (v, state) in total.examples.items():
        known = " (known engine finding)" if rule in KNOWN_ENGINE_FINDINGS else ""
        say(f"--- example of [{rule}]{known}")
        say(explorer.describe_point(recs[v.workload], v.k))
        say(f"  -> {v}")
        if args.dump:
            explorer.dump(recs[v.workload], v, state, Path(args.dump) / rule)
    caught: bool | None = None
    if not args.no_mutant:
        caught = mutant(args, base, lib, set(total.rules()))
    return {"workloads": total.workloads, "states": total.states,
            "violations": len(total.violations), "mutant_caught": caught}  # fmt: skip


def mutant(args: argparse.Namespace, base: Path, lib: Path, baseline_rules: set[str]) -> bool:
    """Re-run the strict workloads with the data file's syncs removed; True once a
    violation of a rule the baseline kept shows up."""
    started = time.monotonic()
    states = 0
    for wl in workload.standard(args.seed):
        if wl.durability != "strict" or args.only not in wl.name:
            continue
        rec = explorer.record(wl, base / f"mutant-{wl.name}", lib, drop_sync=MUTANT_SYNC)
        tally = explorer.explore(rec, random.Random(args.seed), args.samples, args.omissions,
                                 stop=lambda v: v.rule not in baseline_rules)  # fmt: skip
        states += tally.states
        new = [v for v in tally.violations if v.rule not in baseline_rules]
        if new:
            say(f"mutant (no fdatasync of {MUTANT_SYNC}) caught after {states} states, "
                f"{time.monotonic() - started:.0f} s: {new[0]}")  # fmt: skip
            say(explorer.describe_point(rec, new[0].k))
            return True
    say(f"mutant (no fdatasync of {MUTANT_SYNC}) NOT caught in {states} states")
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--samples", type=int, default=8, help="random power states per crash point")
    ap.add_argument("--omissions", type=int, default=4, help="all-but-one states per crash point")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="", help="workloads whose name contains this")
    ap.add_argument("--no-mutant", action="store_true", help="skip the mutant run")
    ap.add_argument("--dump", help="write one violating state per rule below this directory")
    ap.add_argument("--workdir", help="where states are written (default: /dev/shm)")
    args = ap.parse_args()
    parent = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    base = Path(tempfile.mkdtemp(prefix="snapimg-crashstates-", dir=parent))
    try:
        result = run(args, base, recording.build_recorder())
    except recording.RecorderError as err:
        raise SystemExit(f"crashstates: {err}") from None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
