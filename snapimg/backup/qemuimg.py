"""``qemu-img`` for backup files: create, info of a chain, check, commit.

Every call runs ``qemu-img`` as a child that is killed if snapimg is interrupted while
waiting for it (a SIGTERM sent to snapimg alone would otherwise leave it running), and
turns a failure into one :class:`~snapimg.errors.QemuError` line: qemu-img's last error
and its hints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapimg import interrupts
from snapimg.errors import QemuError

QEMU_IMG = "qemu-img"


def run(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    if shutil.which(QEMU_IMG) is None:
        raise QemuError(f"{QEMU_IMG} not found (install the qemu-utils package)")
    proc: subprocess.Popen[str] | None = None
    try:
        with interrupts.deferred():  # a signal now is raised once proc is ours to kill
            proc = subprocess.Popen(
                [QEMU_IMG, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        out, err = proc.communicate()
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode not in ok:
        raise QemuError(f"qemu-img {args[0]}: {_error_text(err, proc.returncode)}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _error_text(stderr: str, status: int) -> str:
    """qemu-img's last error, with the hint lines that follow it (as one line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("qemu-img: ")]
    if not lines:
        return f"status {status}"
    first = starts[-1] if starts else len(lines) - 1
    return " ".join(lines[first:]).removeprefix("qemu-img: ")


def create_qcow2(path: Path, size: int, backing: str | None = None) -> None:
    """A new empty qcow2 image; ``backing`` is a file name relative to ``path``'s
    directory (QEMU resolves it there), of format qcow2."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    run(*args, str(path), str(size))


def info_chain(path: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``path``: the image first, then its backing
    files.  ``-U``: readable while another process writes or holds the image."""
    out = run("info", "-U", "--backing-chain", "--output=json", str(path)).stdout
    chain = json.loads(out)
    return chain if isinstance(chain, list) else [chain]


def backing_file(path: Path) -> str | None:
    """The backing file name recorded in ``path`` (as written: relative), or None."""
    info = json.loads(run("info", "-U", "--output=json", str(path)).stdout)
    name = info.get("backing-filename")
    return str(name) if name else None


@dataclass
class CheckResult:
    status: int  # qemu-img check: 0 clean, 2 corrupted, 3 leaked clusters only
    corruptions: int
    leaks: int
    message: str

    @property
    def ok(self) -> bool:
        return self.status in (0, 3)

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "ok": self.ok,
        }


def check(path: Path) -> CheckResult:
    """``qemu-img check`` of one qcow2 file (its metadata, not its backing files)."""
    proc = run("check", "-f", "qcow2", "--output=json", str(path), ok=(0, 2, 3))
    try:
        obj = json.loads(proc.stdout)
    except ValueError:
        obj = {}
    corruptions = int(obj.get("corruptions", 0))
    leaks = int(obj.get("leaks", 0))
    parts = []
    if corruptions:
        parts.append(f"{corruptions} corruptions")
    if leaks:
        parts.append(f"{leaks} leaked clusters")
    return CheckResult(proc.returncode, corruptions, leaks, ", ".join(parts) or "clean")


def commit(top: Path) -> None:
    """Write ``top``'s clusters into its backing file (``-d``: leave ``top`` as it is).

    The backing node is opened with ``discard=ignore`` so that ranges ``top`` zeroes stay
    allocated zero clusters in the base: no holes are punched in the middle of the file.
    """
    opts = f"driver=qcow2,file.filename={_opt(top)},backing.discard=ignore"
    run("commit", "-q", "-d", "--image-opts", opts)


def _opt(path: Path) -> str:
    """A path as a QEMU option value (commas doubled)."""
    return str(path.absolute()).replace(",", ",,")
