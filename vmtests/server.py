"""`snapimg serve` as the rig uses it: only through the snapimg command line and NBD.

:class:`SnapimgServer` starts ``snapimg serve NAME=IMAGE --socket S --control C --store-dir D
[--backend qsd]`` in its own process group, waits for its ready line, creates and drops
snapshots with ``snapimg snapshot create|drop --control C`` and stops the server with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vmtests.config import Settings
from vmtests.errors import VmError


def nbd_uri(socket: Path, export: str) -> str:
    return f"nbd+unix:///{quote(export, safe='@')}?socket={socket}"


@dataclass
class SnapimgServer:
    settings: Settings
    images: dict[str, Path]  # export name -> raw image
    log_dir: Path
    backend: str = "native"  # snapimg serve --backend native|qsd
    process: asyncio.subprocess.Process | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="snapimg-srv-"))  # short socket paths
        self.socket = self.run_dir / "nbd.sock"
        self.control = self.run_dir / "control.sock"
        self.store_dir = self.run_dir / "store"
        self.log_path = self.log_dir / "snapimg-serve.log"

    def uri(self, export: str) -> str:
        return nbd_uri(self.socket, export)

    async def start(self, timeout: float = 30.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir()
        cmd = [
            *self.settings.snapimg_command(),
            "serve",
            *(f"{name}={path}" for name, path in self.images.items()),
            "--socket",
            str(self.socket),
            "--control",
            str(self.control),
            "--store-dir",
            str(self.store_dir),
        ]
        if self.backend != "native":
            cmd += ["--backend", self.backend]
        with self.log_path.open("w") as log:
            log.write(" ".join(cmd) + "\n")
            self.process = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            await self.stop()
            raise VmError(f"snapimg serve printed no ready line within {timeout:g}s") from None
        if not line:
            await self.stop()
            raise VmError(f"snapimg serve exited at start (see {self.log_path})")
        with self.log_path.open("a") as log:
            log.write("ready: " + line.decode(errors="replace"))

    async def cli(self, *args: str) -> str:
        """Run ``snapimg ARGS``; its stdout (stripped); a non-zero exit raises VmError."""
        proc = await asyncio.create_subprocess_exec(
            *self.settings.snapimg_command(), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise VmError(f"snapimg {' '.join(args)}: {err.decode().strip()}")
        return out.decode().strip()

    async def snapshot_create(
        self, export: str, snap: str, writable: bool = False, options: Sequence[str] = ()
    ) -> str:
        """Create snapshot ``export@snap`` (``options``: more ``snapshot create`` options, e.g.
        ``--quiesce --qga SOCKET``); its NBD URI as snapimg prints it."""
        uri = await self.cli(
            "snapshot",
            "create",
            "--control",
            str(self.control),
            f"{export}@{snap}",
            *(["--writable"] if writable else []),
            *options,
        )
        if not uri.startswith("nbd+unix://"):
            raise VmError(f"snapimg snapshot create printed {uri!r}, not an nbd+unix URI")
        return uri.splitlines()[-1]

    async def snapshot_list(self) -> list[dict[str, Any]]:
        """``snapimg snapshot list --json``."""
        result: list[dict[str, Any]] = json.loads(
            await self.cli("snapshot", "list", "--control", str(self.control), "--json")
        )
        return result

    async def snapshot_drop(self, export: str, snap: str) -> None:
        await self.cli("snapshot", "drop", "--control", str(self.control), f"{export}@{snap}")

    async def stop(self, timeout: float = 15.0) -> int | None:
        proc = self.process
        status: int | None = None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            status = proc.returncode
            self.process = None
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return status

    async def __aenter__(self) -> SnapimgServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def nbd_sha256(uri: str) -> str:
    """sha256 of an NBD export's whole content, read with libnbd."""
    return await asyncio.to_thread(_nbd_sha256, uri)


def _nbd_sha256(uri: str) -> str:
    import nbd

    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        size = handle.get_size()
        digest = hashlib.sha256()
        step = 4 << 20
        for offset in range(0, size, step):
            digest.update(handle.pread(min(step, size - offset), offset))
    finally:
        handle.shutdown()
    return digest.hexdigest()


async def nbd_copy(uri: str, dest: Path, rate_limit: int | None = None) -> None:
    """Copy an export to a raw file with ``qemu-img convert`` (optionally rate-limited, B/s)."""
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw"]
    if rate_limit:
        cmd += ["-r", str(rate_limit)]
    cmd += [uri, str(dest)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise VmError(f"qemu-img convert {uri}: {err.decode().strip()}")
