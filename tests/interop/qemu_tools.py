"""Thin wrappers around qemu-io / qemu-img / libnbd tools for the interop tests."""

from __future__ import annotations

import subprocess


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def qemu_io(uri: str, *commands: str, read_only: bool = False, check: bool = True) -> str:
    """Run qemu-io commands on an NBD URI; fails on any command error unless check=False."""
    args = ["qemu-io", "-f", "raw"]
    if read_only:
        args.append("-r")
    for c in commands:
        args += ["-c", c]
    proc = run(*args, uri, check=check)
    out = proc.stdout + proc.stderr
    if check:
        bad = [ln for ln in out.splitlines() if "fail" in ln.lower() or "error" in ln.lower()]
        assert not bad, f"qemu-io reported errors: {bad}"
    return out
