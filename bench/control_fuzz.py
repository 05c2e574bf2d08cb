#!/usr/bin/env python3
"""Bench-sized structure-aware fuzz run of the control socket (issue 14).

Starts ``snapimg serve`` (native and qsd backends) on a scratch image and sends each
N requests built by tests/interop/control_fuzz.py: every parameter of every method gets
hostile values, whole lines are broken.  Fails (exit 1) on the first response that is
not one clean error line or result, on an ``InternalError``, on a snapshot the model
does not expect (half-created or half-dropped), on a traceback in the server's log, or
if the origin no longer reads and writes over NBD afterwards.

Usage: bench/control_fuzz.py [--requests 100000] [--qsd-requests 5000] [--seed 1] [--json]
Prints one JSON object with --json: per backend the requests, results, errors by type,
model checks, internal errors (must be 0) and requests/s, plus "violations" (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fuzzer lives with the tests that use it too

from tests.interop.control_fuzz import Fuzzer, FuzzFailure  # noqa: E402
from tests.interop.serving import Serve  # noqa: E402

MiB = 1 << 20


def fuzz_backend(backend: str, requests: int, seed: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="snapimg-fuzz-"))
    try:
        img = work / "d.img"
        img.write_bytes(b"\x5c" * 8 * MiB)
        server = Serve(work, [f"d={img}"], "--backend", backend)
        violation = None
        try:
            fuzzer = Fuzzer(server.control, "d", seed, server.store if backend == "qsd" else None)
            try:
                report = fuzzer.run(requests).to_json()
            except FuzzFailure as err:
                violation = str(err)
                report = fuzzer.report.to_json()
            uri = server.uri("d")
            io = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0x5d 0 64k", "-c", "read -P 0x5d 0 64k",
                 "-c", "read -P 0x5c 1M 1M", uri], capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if io.returncode != 0 or "fail" in (io.stdout + io.stderr).lower():
                violation = violation or f"origin I/O after fuzzing failed: {io.stdout}{io.stderr}"
        finally:
            status = server.stop()
            server.kill()
        log = server.stderr()
        if "Traceback" in log or "InternalError" in log:
            violation = violation or f"server log: {log[-2000:]}"
        if status != 143:
            violation = violation or f"server exit status {status} after SIGTERM"
        return {**report, "violation": violation}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000, help="native backend (100000)")
    ap.add_argument("--qsd-requests", type=int, default=5000, help="qsd backend (5000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {
        "native": fuzz_backend("native", args.requests, args.seed),
        "qsd": fuzz_backend("qsd", args.qsd_requests, args.seed),
    }
    out = {
        "seed": args.seed,
        "backends": results,
        "violations": sum(r["violation"] is not None for r in results.values()),
        "loadavg": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, r in results.items():
            print(
                f"{name}: {r['requests']} requests, {r['errors']} errors "
                f"{r['error_types']}, {r['requests_per_s']} req/s, violation: {r['violation']}"
            )
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
