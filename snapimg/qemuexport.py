"""A private qemu-storage-daemon exporting one image file over NBD on a unix socket.

Used to read images of any QEMU format (qcow2 chains included: QEMU opens the backing
files) and to write qcow2 images with QEMU's own code: snapimg never parses or writes
qcow2 itself.  The daemon runs in its own process group with a private directory for its
socket and pid file, and dies with the snapimg process that started it (PR_SET_PDEATHSIG),
so a killed snapimg leaves no daemon writing behind it (and the next export removes the
directory it left).  The export is ready when the
daemon has written its pid file (after every command-line option was processed).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from snapimg import interrupts
from snapimg.errors import QemuError

QSD_BINARY = "qemu-storage-daemon"
EXPORT_NAME = "img"
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT = 30.0


_DIR_PREFIX = "snapimg-export-"  # + the owner's pid + "-" + random
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # bound here: nothing is loaded after fork


def _remove_orphaned_dirs() -> None:
    """Remove the directories of exports whose snapimg process was killed (SIGKILL gives
    no chance to clean up; the daemon itself died with it)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        owner = path.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuExport:
    """``path`` opened by QEMU as ``fmt`` and exported as NBD export ``img``.

    ``writable``: a read-write export (the image is closed cleanly by :meth:`close`; with
    ``no_flush`` QEMU ignores flushes, as ``qemu-img convert`` does for its output: for a
    new file that the caller fsyncs itself once complete, and discards if it is not);
    ``locking``: QEMU's image locks (off lets inspection read images that
    a running QEMU holds); ``allocation_depth``: also offer ``qemu:allocation-depth``
    (which layer of a backing chain holds each range); ``raw_size``: with ``fmt`` raw,
    export only the first ``raw_size`` bytes of the file.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        *,
        writable: bool = False,
        locking: bool = True,
        allocation_depth: bool = False,
        no_flush: bool = False,
        raw_size: int | None = None,
    ) -> None:
        if shutil.which(QSD_BINARY) is None:
            raise QemuError(f"{QSD_BINARY} not found (install the qemu-utils package)")
        self.path = path
        _remove_orphaned_dirs()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        sock = self._dir / "nbd.sock"
        pidfile = self._dir / "qsd.pid"
        node: dict[str, Any] = {
            "driver": fmt,
            "node-name": "img",
            "read-only": not writable,
            "file": {
                "driver": "file",
                "filename": str(path.absolute()),
                "locking": "on" if locking else "off",
            },
        }
        if no_flush:
            node["cache"] = {"no-flush": True}
        if raw_size is not None:  # raw only: the first raw_size bytes of the file
            node["size"] = raw_size
        export = (
            f"type=nbd,id=exp,node-name=img,name={EXPORT_NAME},"
            f"writable={'on' if writable else 'off'}"
        )
        if allocation_depth:
            export += ",allocation-depth=on"
        cmd = [
            QSD_BINARY,
            "--blockdev",
            json.dumps(node),
            "--nbd-server",
            f"addr.type=unix,addr.path={sock}",
            "--export",
            export,
            "--pidfile",
            str(pidfile),
        ]
        self._log = (self._dir / "stderr.log").open("w+b")
        self._proc: subprocess.Popen[bytes] | None = None
        self.uri = f"nbd+unix:///{EXPORT_NAME}?socket={sock}"
        try:
            with interrupts.deferred():  # a signal now is raised once the daemon is ours
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=self._log,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            self._wait_ready(pidfile)
        except BaseException:
            self.close(kill=True)
            raise

    def _wait_ready(self, pidfile: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while not (pidfile.exists() and pidfile.stat().st_size > 0):
            if self._proc.poll() is not None:
                raise QemuError(
                    f"qemu-storage-daemon could not open {self.path}: {self._error_line()}"
                )
            if time.monotonic() > deadline:
                raise QemuError(
                    f"qemu-storage-daemon did not start within "
                    f"{_START_TIMEOUT:.0f} s for {self.path}"
                )
            time.sleep(0.005)

    def _error_line(self) -> str:
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        text = lines[-1] if lines else "no error message"
        text = text.removeprefix("qemu-storage-daemon: ")
        if text.startswith("--blockdev {"):  # the option's JSON: not worth repeating
            text = text.partition("}: ")[2] or text
        return text

    def close(self, kill: bool = False) -> None:
        """Stop the daemon: SIGTERM (QEMU flushes and closes the image) or SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                except BaseException:  # interrupted while waiting: do not leave it behind
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise
            if not kill and proc.returncode not in (0, -signal.SIGTERM):
                raise QemuError(
                    f"qemu-storage-daemon failed on {self.path} "
                    f"(status {proc.returncode}): {self._error_line()}"
                )
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> QemuExport:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(kill=t is not None)
