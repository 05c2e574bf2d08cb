"""The recorded child: runs a workload's steps against the engine, one thread, and notes
``B <i>`` before and ``E <i> <status> <json>`` after each step in the marker file (the
recorder puts those notes into the call log, in order).  The JSON holds what the live
engine reported: each snapshot's validity and a digest of every readable device, so
that the explorer can check its model against the engine before judging crash states.

Usage: python -m reliability.crash.runner WORKLOAD.json ROOT MARKFILE
(ROOT holds the origin files ``<name>.img`` and the store directory ``store``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from reliability.crash.workload import BOOT, Step, Workload
from snapimg.blockdev import BlockDevice
from snapimg.engine import Engine
from snapimg.errors import ReleasedRangeError, SnapimgError


def device_digest(dev: BlockDevice, block_size: int) -> str:
    """sha256 of the device's content, a released block counting as the bytes b"R"."""
    h = hashlib.sha256()
    for off in range(0, dev.size, block_size):
        try:
            h.update(dev.pread(off, min(block_size, dev.size - off)))
        except ReleasedRangeError:
            h.update(b"R")
    return h.hexdigest()[:16]


def summary(eng: Engine | None, wl: Workload) -> dict[str, object]:
    if eng is None:
        return {}
    valid: dict[str, bool] = {}
    digests: dict[str, str] = {}
    for o in wl.origins:
        digests[o] = device_digest(eng.origin_device(o), wl.block_size)
    for info in eng.snapshots():
        name = f"{info.origin}@{info.snap}"
        valid[name] = info.valid
        if info.valid:
            dev = eng.snapshot_device(info.origin, info.snap)
            digests[name] = device_digest(dev, wl.block_size)
    return {"valid": valid, "digests": digests}


def device(eng: Engine, name: str) -> BlockDevice:
    if "@" in name:
        origin, snap = name.split("@", 1)
        return eng.snapshot_device(origin, snap)
    return eng.origin_device(name)


def run_step(eng: Engine | None, step: Step, wl: Workload, root: Path) -> Engine | None:
    if step.kind == "open":
        origins = {o: root / f"{o}.img" for o in wl.origins}
        return Engine.open(root / "store", origins, wl.block_size, wl.durability,  # type: ignore[arg-type]
                           boot_id=BOOT)  # fmt: skip
    assert eng is not None
    if step.kind == "close":
        eng.close()
        return None
    if step.kind == "create":
        eng.create_snapshot(step.dev, step.snap, step.max_size, step.writable, step.on_full)  # type: ignore[arg-type]
    elif step.kind == "drop":
        eng.drop_snapshot(step.dev, step.snap)
    elif step.kind == "eflush":
        eng.flush()
    elif step.kind == "flush":
        device(eng, step.dev).flush()
    elif step.kind == "write":
        device(eng, step.dev).pwrite(step.off, step.data(), step.fua)
    elif step.kind == "zero":
        device(eng, step.dev).write_zeroes(step.off, step.length, step.fua, step.punch)
    elif step.kind == "trim":
        device(eng, step.dev).trim(step.off, step.length)
    else:
        raise ValueError(f"unknown step {step.kind!r}")
    return eng


def main() -> None:
    wl = Workload.from_json(Path(sys.argv[1]).read_text())
    root = Path(sys.argv[2])
    mark = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    eng: Engine | None = None
    for i, step in enumerate(wl.steps):
        os.write(mark, f"B {i}\n".encode())
        status = "ok"
        try:
            eng = run_step(eng, step, wl, root)
        except SnapimgError as err:
            status = type(err).__name__
        os.write(mark, f"E {i} {status} {json.dumps(summary(eng, wl))}\n".encode())


if __name__ == "__main__":
    main()
