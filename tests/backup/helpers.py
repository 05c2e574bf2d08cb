"""Running snapimg and qemu-io from backup tests."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]


def snapimg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SNAPIMG, *map(str, args)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"snapimg {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def snapimg_json(*args: str | Path) -> Any:
    return json.loads(snapimg(*args, "--json").stdout)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, target], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512
