"""Start and stop a real ``snapimg serve`` process for tests (everything in a tmp dir)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]
ROOT = Path(__file__).resolve().parents[2]


def bin_dir_for_any_user() -> Path | None:
    """A ``bin`` directory with ``python`` and ``snapimg`` that every user may run: this
    interpreter's, or else the repository's ``.venv`` (tox keeps its envs mode 0700)."""
    for candidate in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        snapimg = candidate / "snapimg"
        if snapimg.exists() and all(
            p.stat().st_mode & 0o005 == 0o005 for p in [snapimg, *snapimg.parents]
        ):
            return candidate
    return None


def snapimg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SNAPIMG, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"snapimg {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Serve:
    """A running ``snapimg serve``; :meth:`stop` sends SIGTERM and returns the exit code."""

    def __init__(
        self, workdir: Path, images: list[str], *extra: str, store: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "nbd.sock"
        self.control = workdir / "control.sock"
        self.store = store or workdir / "store"
        self.pid_file = workdir / "serve.pid"
        cmd = [
            *SNAPIMG, "serve", *images,
            "--socket", str(self.socket), "--control", str(self.control),
            "--store-dir", str(self.store), "--pid-file", str(self.pid_file), *extra,
        ]  # fmt: skip
        self.stderr_path = workdir / "serve.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self.ready_line = self._wait_ready(60)

    def _wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    return line
            if self.proc.poll() is not None:
                break
        self.kill()
        raise AssertionError(f"serve did not get ready: {self.stderr_path.read_text()}")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
