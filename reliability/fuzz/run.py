"""The fuzzing process: atheris (libFuzzer for Python, coverage-guided) on one target.

Usage: python -m reliability.fuzz.run [--server NAME=MODULE:FUNCTION]... TARGET WORKDIR
       [libFuzzer options and corpus dirs]
``--server`` adds a transmission server (target ``transmission-NAME``): FUNCTION starts
serving a connected socket, as :data:`reliability.fuzz.targets.StartServer` says; a C
extension built with ``-fsanitize=address,undefined,fuzzer-no-link`` and run with
atheris' ``asan_with_fuzzer.so`` preloaded is then fuzzed coverage-guided under ASan and
UBSan (docs/fuzzing.md).  The snapimg.nbd and snapimg.engine modules are instrumented
for coverage.  WORKDIR gets the host (``host-<pid>``: engine store, origin images,
``nbd.sock`` for a second client), ``ready`` (naming the host's directory) once serving,
and ``stats.json`` every 1000 inputs (inputs run, server errors logged, the file of the
C extension this process imported).  A
failing input ends the run the libFuzzer way: its traceback, the input saved by
-artifact_prefix, a non-zero exit.  With -runs=N the last run checks the host once more.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

import atheris
from atheris.import_hook import instrument_imports

with instrument_imports(include=["snapimg.nbd", "snapimg.engine"]):
    from reliability.fuzz.host import Host
    from reliability.fuzz.targets import (
        DATAPATHS,
        TRANSMISSION_SERVERS,
        FuzzFailure,
        Target,
        make_target,
    )


def main() -> None:
    args = sys.argv[1:]
    while args and args[0] == "--server":
        server, where = args[1].split("=", 1)
        module, function = where.split(":", 1)
        TRANSMISSION_SERVERS[server] = getattr(importlib.import_module(module), function)
        args = args[2:]
    name, workdir, rest = args[0], Path(args[1]), args[2:]
    fixed = args[: len(args) - len(rest)]
    runs = next((int(a.split("=", 1)[1]) for a in rest if a.startswith("-runs=")), 0)
    stats = workdir / "stats.json"
    spec = importlib.util.find_spec("snapimg._datapath")
    extension = spec.origin if spec is not None else None
    made: list[Target] = []

    def target() -> Target:
        """The host and target, made at the first input: a libFuzzer merge's outer process
        runs none; each process has a host of its own (a store is locked while open)."""
        if not made:
            host = Host(workdir / f"host-{os.getpid()}", DATAPATHS.get(name))
            made.append(make_target(name, host))
            ready = workdir / "ready.tmp"  # whole or absent: the parent reads it at once
            ready.write_text(str(host.workdir))
            os.replace(ready, workdir / "ready")
        return made[0]

    def one_input(data: bytes) -> None:
        t = target()
        t.one_input(data)
        if t.inputs % 1000 == 0 or t.inputs == runs:
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(json.dumps({"inputs": t.inputs, "server_errors": len(t.host.errors),
                                       "extension": extension}))  # fmt: skip
            os.replace(tmp, stats)
        if t.inputs == runs and (bad := t.host.snapshot_intact()):
            raise FuzzFailure(bad)

    # libFuzzer re-runs argv[0] through the shell for -merge and -fork: make it this command
    again = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "reliability.fuzz.run", *fixed))
    atheris.Setup([again, *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
