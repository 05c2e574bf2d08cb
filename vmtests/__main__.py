"""``python -m vmtests``: build the guest images, list or run scenarios outside pytest.

    python -m vmtests build                      # build (or find cached) FreeDOS artefacts
    python -m vmtests list                       # scenarios and controllers
    python -m vmtests run SCENARIO|all [-c CTL ...] [--backend native|qsd] [--json] [--keep-logs]

``run`` exits 0 when every scenario run passed, 1 otherwise; logs of failed runs are kept
under the log directory (SNAPIMG_VM_LOG_DIR, default vmtests/logs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from snapimg.errors import SnapimgError
from vmtests import config
from vmtests.controllers import CONTROLLERS
from vmtests.errors import VmError
from vmtests.guests import freedos
from vmtests.runner import run_scenario
from vmtests.scenarios import SCENARIOS


def _build(args: argparse.Namespace) -> int:
    settings = config.load()
    artifacts = freedos.build(settings)
    start, count = artifacts.disk_layout()
    print(f"boot floppy: {artifacts.boot_floppy}")
    print(f"test disk:   {artifacts.test_disk} (raw region LBA {start} + {count} sectors)")
    return 0


def _list(args: argparse.Namespace) -> int:
    print("scenarios:   " + " ".join(SCENARIOS))
    print("controllers: " + " ".join(CONTROLLERS))
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = config.load()
    if reason := settings.accel_unusable():
        print(f"vmtests: skipped: {reason}", file=sys.stderr)
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    failed = 0
    reports = []
    for name in names:
        for controller in args.controller or ["ide"]:
            log_dir = settings.log_dir / f"{name}-{controller}-{time.strftime('%Y%m%dT%H%M%S')}"
            began = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="vmtests-") as work:
                try:
                    result = run_scenario(
                        name, controller, settings, Path(work), log_dir, args.backend
                    )
                    problems = result.problems
                    facts = result.facts
                except (SnapimgError, VmError) as err:
                    problems, facts = [str(err)], {}
            seconds = round(time.monotonic() - began, 1)
            ok = not problems
            failed += not ok
            if ok and not args.keep_logs:
                shutil.rmtree(log_dir, ignore_errors=True)
            reports.append(
                {
                    "scenario": name,
                    "controller": controller,
                    "backend": args.backend,
                    "passed": ok,
                    "seconds": seconds,
                    "problems": problems,
                    "facts": facts,
                    "logs": None if ok and not args.keep_logs else str(log_dir),
                }
            )
            if not args.json:
                print(
                    f"{'PASS' if ok else 'FAIL'} {name} [{controller}, {args.backend}] {seconds}s"
                )
                for problem in problems:
                    print(f"  - {problem}")
                if not ok:
                    print(f"  logs: {log_dir}")
    if args.json:
        print(json.dumps(reports, indent=2))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmtests", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the FreeDOS boot floppy and test disk").set_defaults(
        func=_build
    )
    sub.add_parser("list", help="scenarios and controllers").set_defaults(func=_list)
    run = sub.add_parser("run", help="run a scenario (or 'all') on controllers")
    run.add_argument("scenario", choices=[*SCENARIOS, "all"])
    run.add_argument(
        "-c",
        "--controller",
        action="append",
        choices=list(CONTROLLERS),
        help="repeatable; default ide",
    )
    run.add_argument(
        "--backend",
        choices=["native", "qsd"],
        default="native",
        help="snapimg serve --backend (default native)",
    )
    run.add_argument("--json", action="store_true", help="print results as JSON")
    run.add_argument("--keep-logs", action="store_true", help="keep logs of passed runs too")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except (SnapimgError, VmError) as err:
        print(f"vmtests: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
