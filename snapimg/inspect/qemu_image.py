"""Non-raw images (qcow2, vmdk, ...): ``qemu-img info`` and a private qemu-storage-daemon export.

``qemu-img info`` names the format; for anything but raw, :class:`QemuImageSource` has a
private qemu-storage-daemon (:class:`snapimg.qemuexport.QemuExport`) export the image
read-only over NBD, and reads it as an :class:`~snapimg.inspect.source.NbdSource` (so the
allocation map comes from QEMU's block status).  The daemon is stopped on close.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from snapimg.errors import UsageError
from snapimg.inspect.source import NbdSource
from snapimg.qemuexport import QemuExport


def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (shared lock: works on images in use)."""
    if shutil.which("qemu-img") is None:
        return {"format": "raw", "virtual-size": None}
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise UsageError(f"{path}: qemu-img info: {msg}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


class QemuImageSource(NbdSource):
    """An image of any QEMU format, exported read-only by a private qemu-storage-daemon
    (QEMU's locks off: inspection works on images a running QEMU holds)."""

    def __init__(self, path: Path, fmt: str, name: str | None = None) -> None:
        self._export: QemuExport | None = QemuExport(path, fmt, locking=False)
        try:
            super().__init__(self._export.uri, format=fmt)
        except BaseException:
            self._stop()
            raise
        self.name = name or str(path)

    def _stop(self) -> None:
        export, self._export = self._export, None
        if export is not None:
            export.close(kill=True)  # read-only: nothing to write back

    def close(self) -> None:
        super().close()
        self._stop()
