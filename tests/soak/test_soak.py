"""A short run of bench/soak.py (the 30-minute soak of issue 14 is not run in CI): the
same clients, lifecycle, backups and end checks for 18 seconds on a 32 MiB image.  Its
4.5-second warm-up is still the server's ramp-up (connections growing their buffers,
the first backup's 4 MiB reads), so resident memory is held to 2x here, to 1.2x after
the minute of warm-up of a real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapimg.engine import compiled

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("datapath", ["compiled", "python"])
def test_short_soak(tmp_path: Path, datapath: str) -> None:
    if datapath == "compiled" and not compiled.available():
        pytest.skip("the C extension snapimg._datapath is not built")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.3", "--size", "32",
         "--datapath", datapath, "--backup-interval", "5", "--event-interval", "0.5",
         "--rss-limit", "2", "--dir", str(tmp_path), "--json",
         # a loaded machine gets through fewer commands in 18 s: go on until these happened
         "--until", "backups_made=2", "--until", "snapshots_created=2",
         "--until", "snapshots_dropped=1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.stdout, proc.stderr
    out = json.loads(proc.stdout)
    if out["violations"]:  # every detail, untruncated: CI logs are all there is
        pytest.fail(f"{out['violations']} violations:\n" + "\n".join(out["violation_details"]))
    assert proc.returncode == 0, proc.stderr
    assert out["datapath"] == datapath
    ops, snaps, backups = out["ops"], out["snapshots"], out["backups"]
    for kind in ("write", "zero", "trim", "flush", "read", "snap_read", "snap_write"):
        assert ops.get(kind, 0) > 0, (kind, ops)
    assert snaps["created"] >= 2 and snaps["dropped"] >= 1, snaps
    assert backups["made"] >= 2, backups
    assert out["backups_at_end"]["verify_ok"] is True
    assert out["backups_at_end"]["restored_at_end"] == out["backups_at_end"]["points_at_end"]
    assert out["server_exit"] == 143
    res = out["resources"]
    assert (res["fds"]["end"], res["threads"]["end"]) == (
        res["fds"]["baseline"],
        res["threads"]["baseline"],
    )
