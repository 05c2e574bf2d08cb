"""Recording a workload's file-system calls with the LD_PRELOAD recorder (recorder.c).

:func:`build_recorder` compiles recorder.c with the system's gcc (once per source
version, cached); :func:`record` runs a command under it and :func:`parse_log` turns the
log into :data:`Op` records in the order the calls completed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("recorder.c")


class RecorderError(Exception):
    """The recorder could not be built, or a recording is unusable."""


@dataclass(frozen=True)
class Write:
    ino: int
    offset: int
    data: bytes
    dsync: bool  # O_DSYNC / RWF_DSYNC: durable when it returned


@dataclass(frozen=True)
class Fallocate:
    ino: int
    mode: int
    offset: int
    length: int


@dataclass(frozen=True)
class Truncate:
    ino: int
    size: int


@dataclass(frozen=True)
class Sync:
    """fsync/fdatasync of a file or a directory returned success."""

    ino: int


@dataclass(frozen=True)
class SyncAll:
    """sync() or syncfs()."""


@dataclass(frozen=True)
class Create:
    parent: int
    name: str
    ino: int
    is_dir: bool


@dataclass(frozen=True)
class Rename:
    old_parent: int
    old_name: str
    new_parent: int
    new_name: str
    ino: int
    replaced: int  # inode the new name pointed to before, 0 if none
    flags: int


@dataclass(frozen=True)
class Unlink:
    parent: int
    name: str
    ino: int


@dataclass(frozen=True)
class Mark:
    text: str


@dataclass(frozen=True)
class Unsupported:
    text: str


Op = Write | Fallocate | Truncate | Sync | SyncAll | Create | Rename | Unlink | Mark | Unsupported


def build_recorder(cache: Path | None = None) -> Path:
    """The recorder as a shared object, compiled with gcc on first use."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src).hexdigest()[:16]
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "snapimg"
    lib = cache / f"crash-recorder-{tag}.so"
    if lib.exists():
        return lib
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RecorderError("the crash recorder needs gcc (apt-get install gcc)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
        out = Path(tmp.name)
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
           str(SOURCE), "-ldl", "-lpthread"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        raise RecorderError(f"cannot build the crash recorder: {proc.stderr.strip()}")
    out.rename(lib)
    return lib


def recorder_env(
    lib: Path, root: Path, log: Path, mark: Path, drop_sync: str | None
) -> dict[str, str]:
    """Environment that runs a child under the recorder."""
    env = dict(os.environ)
    env.update(CRASHREC_LOG=str(log), CRASHREC_ROOT=str(root), CRASHREC_MARK=str(mark),
               LD_PRELOAD=str(lib))  # fmt: skip
    env.pop("CRASHREC_DROP_SYNC", None)
    if drop_sync:
        env["CRASHREC_DROP_SYNC"] = drop_sync
    return env


def _name(hexname: str) -> str:
    return bytes.fromhex(hexname).decode()


def parse_log(buf: bytes) -> list[Op]:
    ops: list[Op] = []
    pos = 0
    while pos < len(buf):
        nl = buf.index(b"\n", pos)
        f = buf[pos:nl].decode().split()
        plen = int(f[-1])
        payload = buf[nl + 1 : nl + 1 + plen]
        if len(payload) != plen:
            raise RecorderError("recording ends inside a record")
        pos = nl + 1 + plen
        kind, a = f[0], f[1:-1]
        if kind == "W":
            ops.append(Write(int(a[0]), int(a[1]), payload, a[2] == "1"))
        elif kind == "Z":
            ops.append(Fallocate(int(a[0]), int(a[1]), int(a[2]), int(a[3])))
        elif kind == "T":
            ops.append(Truncate(int(a[0]), int(a[1])))
        elif kind == "S":
            ops.append(Sync(int(a[0])))
        elif kind == "G":
            ops.append(SyncAll())
        elif kind == "C":
            ops.append(Create(int(a[0]), _name(a[1]), int(a[2]), a[3] == "1"))
        elif kind == "R":
            ops.append(Rename(int(a[0]), _name(a[1]), int(a[2]), _name(a[3]), int(a[4]),
                              int(a[5]), int(a[6])))  # fmt: skip
        elif kind == "U":
            ops.append(Unlink(int(a[0]), _name(a[1]), int(a[2])))
        elif kind == "M":
            ops.append(Mark(payload.decode()))
        elif kind == "X":
            ops.append(Unsupported(payload.decode()))
        else:
            raise RecorderError(f"unknown record kind {kind!r}")
    return ops
