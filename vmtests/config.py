"""Settings of the VM rig, read from the environment.

- ``SNAPIMG_FREEDOS_IMAGE``: the FreeDOS boot floppy (default: ../shared/images/freedos/
  freedos-boot-1.44M.img next to the repository).
- ``SNAPIMG_FREEDOS_SHA256``: the sha256 the floppy must have (default: the published sha256
  of the default image when that is used, none for another image; ``-`` turns the check off).
- ``SNAPIMG_ACCEL``: ``tcg`` (default) or ``kvm``; kvm that is not usable skips VM tests.
- ``SNAPIMG_VM_LOG_DIR``: where per-test serial and QEMU logs go (default vmtests/logs).
- ``SNAPIMG_CACHE_DIR``: built guest images (default images/cache; git-ignored).
- ``SNAPIMG_VM_TIMEOUT_SCALE``: multiplies every guest timeout (default 1; e.g. 20 for nested
  KVM, where FreeDOS takes minutes to boot).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from snapimg.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FREEDOS_IMAGE = REPO.parent / "shared" / "images" / "freedos" / "freedos-boot-1.44M.img"
# shared/images/freedos/PROVENANCE.md
DEFAULT_FREEDOS_SHA256 = "2546c15c6cba5814f7a318b1ef4e24158504d73dd24ba6eb6133ffe87686a056"
ACCELS = ("tcg", "kvm")


@dataclass(frozen=True)
class Settings:
    freedos_image: Path
    freedos_sha256: str | None
    accel: str
    log_dir: Path
    cache_dir: Path
    timeout_scale: float = 1.0

    def snapimg_command(self) -> list[str]:
        """The snapimg CLI, run by the interpreter that runs the rig."""
        return [sys.executable, "-m", "snapimg.cli.main"]

    def accel_args(self) -> list[str]:
        if self.accel == "kvm":
            # Nested KVM loses the floppy IRQ with the default PIT tick policy.
            return ["-accel", "kvm", "-global", "kvm-pit.lost_tick_policy=discard"]
        return ["-accel", "tcg"]

    def accel_unusable(self) -> str | None:
        """Why the chosen accelerator cannot run here, or None."""
        if self.accel != "kvm":
            return None
        if not os.path.exists("/dev/kvm"):
            return "SNAPIMG_ACCEL=kvm but /dev/kvm does not exist"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "SNAPIMG_ACCEL=kvm but /dev/kvm is not accessible"
        return _kvm_probe()


@functools.cache
def _kvm_probe() -> str | None:
    """None if QEMU can initialise KVM here, else QEMU's complaint."""
    try:
        result = subprocess.run(
            [
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-no-user-config",
                "-qmp",
                "stdio",
            ],
            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SNAPIMG_ACCEL=kvm but QEMU could not start with KVM: {err}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"SNAPIMG_ACCEL=kvm but QEMU cannot use KVM: {lines[-1] if lines else '?'}"
    return None


def load() -> Settings:
    env = os.environ
    accel = env.get("SNAPIMG_ACCEL", "tcg").strip().lower() or "tcg"
    if accel not in ACCELS:
        raise UsageError(f"SNAPIMG_ACCEL must be one of {', '.join(ACCELS)}, not {accel!r}")
    image = Path(env.get("SNAPIMG_FREEDOS_IMAGE") or DEFAULT_FREEDOS_IMAGE)
    sha = env.get("SNAPIMG_FREEDOS_SHA256", "").strip().lower()
    if not sha:
        sha = DEFAULT_FREEDOS_SHA256 if image == DEFAULT_FREEDOS_IMAGE else "-"
    if sha != "-" and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise UsageError(f"SNAPIMG_FREEDOS_SHA256 must be 64 hex digits or '-', not {sha!r}")
    try:
        scale = float(env.get("SNAPIMG_VM_TIMEOUT_SCALE") or 1)
    except ValueError:
        scale = 0
    if scale <= 0:
        raise UsageError("SNAPIMG_VM_TIMEOUT_SCALE must be a positive number")
    return Settings(
        freedos_image=image,
        freedos_sha256=None if sha == "-" else sha,
        accel=accel,
        log_dir=Path(env.get("SNAPIMG_VM_LOG_DIR") or REPO / "vmtests" / "logs"),
        cache_dir=Path(env.get("SNAPIMG_CACHE_DIR") or REPO / "images" / "cache"),
        timeout_scale=scale,
    )
