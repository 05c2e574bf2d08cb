"""Start and supervise one qemu-storage-daemon with a QMP unix socket.

The daemon runs in its own process group with a private runtime directory (QMP socket,
stderr log).  :meth:`Daemon.died` completes with a one-line reason if the process exits
without :meth:`Daemon.stop` having asked it to; the backend turns that into a failure
of ``snapimg serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
from pathlib import Path

from snapimg.backends.qsd.qmp import Qmp
from snapimg.errors import QemuError

QSD_BINARY = "qemu-storage-daemon"
PR_SET_PDEATHSIG = 1
RUNDIR_PREFIX = "snapimg-qsd-"
OWNER_FILE = "owner.pid"  # the snapimg process the run dir belongs to


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, rundir: Path, qmp: Qmp) -> None:
        self.proc = proc
        self.rundir = rundir
        self.qmp = qmp
        self._stopping = False
        self._died: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(self._watch_exit())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, *, binary: str = QSD_BINARY, timeout: float = 10.0) -> Daemon:
        if shutil.which(binary) is None:
            raise QemuError(f"{binary} not found (install the qemu-system-x86/qemu-utils packages)")
        _remove_orphaned_rundirs()
        rundir = Path(tempfile.mkdtemp(prefix=RUNDIR_PREFIX))
        (rundir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        qmp_path = rundir / "qmp.sock"
        log = (rundir / "stderr.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                "--chardev",
                f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
                "--monitor",
                "chardev=qmp0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:  # the socket file appears a moment before QEMU listens on it
                if proc.returncode is not None or loop.time() > deadline:
                    raise QemuError(f"{binary} did not start: {_tail(rundir)}")
                if qmp_path.exists():
                    try:
                        qmp = await Qmp.connect(qmp_path, timeout=timeout)
                        break
                    except QemuError:
                        pass
                await asyncio.sleep(0.02)
        except BaseException:
            _kill_group(proc)
            await proc.wait()
            shutil.rmtree(rundir, ignore_errors=True)
            raise
        return cls(proc, rundir, qmp)

    async def _watch_exit(self) -> None:
        code = await self.proc.wait()
        if not self._stopping and not self._died.done():
            self._died.set_result(
                f"qemu-storage-daemon (pid {self.proc.pid}) died with status {code}: "
                f"{_tail(self.rundir)}"
            )

    async def died(self) -> str:
        """Wait until the daemon dies unexpectedly; return why."""
        return await asyncio.shield(self._died)

    @property
    def dead(self) -> bool:
        return self.proc.returncode is not None

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the daemon to quit, kill its process group if it will not, remove the run dir."""
        self._stopping = True
        if self.proc.returncode is None:
            with contextlib.suppress(QemuError):
                await asyncio.wait_for(self.qmp.execute("quit"), timeout)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                _kill_group(self.proc)
                await self.proc.wait()
        await self.qmp.close()
        await self._watch
        shutil.rmtree(self.rundir, ignore_errors=True)


def _remove_orphaned_rundirs() -> None:
    """Remove run dirs of snapimg processes that were killed (their daemon died with them)."""
    for rundir in Path(tempfile.gettempdir()).glob(f"{RUNDIR_PREFIX}*"):
        try:
            owner = int((rundir / OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(rundir, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge: unreadable, or another user's process


def _die_with_parent() -> None:
    """In the child: get SIGKILL if snapimg dies, so no orphan keeps the image and socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(rundir: Path) -> str:
    try:
        text = (rundir / "stderr.log").read_text(errors="replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
