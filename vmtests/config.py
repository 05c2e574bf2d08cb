"""Settings of the VM rig, read from the environment.

- ``SNAPIMG_FREEDOS_IMAGE``: the FreeDOS boot floppy (default: ../shared/images/freedos/
  freedos-boot-1.44M.img next to the repository).
- ``SNAPIMG_ACCEL``: ``tcg`` (default) or ``kvm``; kvm that is not usable skips VM tests.
- ``SNAPIMG_VM_LOG_DIR``: where per-test serial and QEMU logs go (default vmtests/logs).
- ``SNAPIMG_CACHE_DIR``: built guest images (default images/cache; git-ignored).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from snapimg.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FREEDOS_IMAGE = REPO.parent / "shared" / "images" / "freedos" / "freedos-boot-1.44M.img"
ACCELS = ("tcg", "kvm")


@dataclass(frozen=True)
class Settings:
    freedos_image: Path
    accel: str
    log_dir: Path
    cache_dir: Path

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
        return None


def load() -> Settings:
    env = os.environ
    accel = env.get("SNAPIMG_ACCEL", "tcg").strip().lower() or "tcg"
    if accel not in ACCELS:
        raise UsageError(f"SNAPIMG_ACCEL must be one of {', '.join(ACCELS)}, not {accel!r}")
    image = Path(env.get("SNAPIMG_FREEDOS_IMAGE") or DEFAULT_FREEDOS_IMAGE)
    return Settings(
        freedos_image=image,
        accel=accel,
        log_dir=Path(env.get("SNAPIMG_VM_LOG_DIR") or REPO / "vmtests" / "logs"),
        cache_dir=Path(env.get("SNAPIMG_CACHE_DIR") or REPO / "images" / "cache"),
    )
