"""Non-raw images (qcow2, vmdk, ...): ``qemu-img info`` and a private qemu-storage-daemon export.

``qemu-img info`` names the format; for anything but raw, :class:`QemuImageSource` starts
qemu-storage-daemon exporting the image read-only over NBD on a unix socket in a private
temporary directory, and reads it as an :class:`~snapimg.inspect.source.NbdSource` (so the
allocation map comes from QEMU's block status).  The daemon is stopped on close.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from snapimg.errors import QemuError, UsageError
from snapimg.inspect.source import NbdSource


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
    """An image of any QEMU format, exported read-only by a private qemu-storage-daemon."""

    def __init__(self, path: Path, fmt: str) -> None:
        self._tmp = tempfile.mkdtemp(prefix="snapimg-inspect-")
        sock = os.path.join(self._tmp, "nbd.sock")
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            json.dumps(
                {
                    "driver": fmt,
                    "node-name": "img",
                    "read-only": True,
                    "file": {
                        "driver": "file",
                        "filename": str(path.resolve()),
                        "read-only": True,
                        "locking": "off",
                    },
                }
            ),
            "--nbd-server",
            f"addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=exp,node-name=img,name=img,writable=off",
        ]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._stop()
                raise QemuError(f"qemu-storage-daemon could not open {path}: {err.strip()}")
            time.sleep(0.02)
        try:
            super().__init__(f"nbd+unix:///img?socket={sock}", format=fmt)
        except Exception:
            self._stop()
            raise
        self.name = str(path)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> None:
        super().close()
        self._stop()
