"""Images built by the real tools (sfdisk, mkfs.fat + mtools, mkfs.ext4 -d, mkntfs), and NBD
exports of them by qemu-storage-daemon, for the inspect tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapimg.cli.main import main
from tests.listening import wait_listening

MiB = 1 << 20


def run(*cmd: str | Path, input: str | None = None) -> str:
    return subprocess.run(
        [str(c) for c in cmd], input=input, capture_output=True, text=True, check=True
    ).stdout


def place(disk: Path, part_image: Path, offset: int) -> None:
    """Copy a filesystem image into the disk image at ``offset``, keeping holes."""
    run(
        "dd",
        f"if={part_image}",
        f"of={disk}",
        "bs=64K",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
        "status=none",
    )


def make_fat16(path: Path, size: int, files: dict[str, bytes], label: str = "FATVOL") -> None:
    path.unlink(missing_ok=True)
    run("mkfs.fat", "-F", "16", "-s", "1", "-n", label, "-C", path, str(size // 1024))
    dirs = sorted({str(Path(n).parent) for n in files if str(Path(n).parent) != "."})
    for d in dirs:
        run("mmd", "-i", path, f"::/{d}")
    src = path.with_suffix(".src")
    for name, data in files.items():
        src.write_bytes(data)
        run("mcopy", "-i", path, src, f"::/{name}")
    src.unlink()


def make_ext4(path: Path, size: int, files: dict[str, bytes], label: str = "extvol") -> None:
    root = path.with_suffix(".root")
    shutil.rmtree(root, ignore_errors=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    path.unlink(missing_ok=True)
    run("mkfs.ext4", "-q", "-F", "-L", label, "-d", root, path, f"{size // 1024}k")
    shutil.rmtree(root)


def make_ntfs(path: Path, size: int, files: dict[str, bytes], label: str = "ntfsvol") -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkntfs", "-Q", "-q", "-F", "-L", label, path)
    src = path.with_suffix(".src")
    for name, data in files.items():  # ntfscp writes into the image without mounting it
        src.write_bytes(data)
        run("ntfscp", "-q", path, src, name)
    src.unlink()


def blkid(image: Path, offset: int) -> dict[str, str]:
    out = run("blkid", "-p", "-o", "export", "-O", str(offset), image)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def inspect_json(target: str | Path, cap: pytest.CaptureFixture[Any]) -> dict[str, Any]:
    """``snapimg inspect --json`` in-process; ``cap``: capsys or capfdbinary."""
    cap.readouterr()
    assert main(["inspect", "--json", str(target)]) == 0
    out = cap.readouterr().out
    rep: dict[str, Any] = json.loads(out.decode() if isinstance(out, bytes) else out)
    return rep


@dataclass
class GptDisk:
    """A 64 MiB GPT disk: 1 FAT16 (ESP), 2 ext4, 3 NTFS; the files put into each."""

    path: Path
    fat_files: dict[str, bytes] = field(default_factory=dict)
    ext_files: dict[str, bytes] = field(default_factory=dict)
    ntfs_files: dict[str, bytes] = field(default_factory=dict)
    part_images: dict[int, Path] = field(default_factory=dict)


@pytest.fixture(scope="session")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> GptDisk:
    d = tmp_path_factory.mktemp("gpt")
    rnd = random.Random(7)
    disk = GptDisk(d / "disk.img")
    disk.fat_files = {
        "HELLO.TXT": b"hello from FAT\r\n",
        "A long file name.bin": rnd.randbytes(70_000),
        "SUB/INNER.DAT": rnd.randbytes(5000),
    }
    disk.ext_files = {
        "hello.txt": b"hello from ext4\n",
        "dir/nested/big.bin": rnd.randbytes(1_300_000),
        "dir/empty": b"",
    }
    disk.ntfs_files = {"notes.txt": b"hello from NTFS\r\n", "data.bin": rnd.randbytes(200_000)}
    with open(disk.path, "wb") as f:
        f.truncate(64 * MiB)
    run(
        "sfdisk",
        "-q",
        disk.path,
        input=(
            "label: gpt\n"
            'size=16MiB, type=uefi, name="esp"\n'
            'size=20MiB, type=linux, name="root fs"\n'
            'size=20MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="win"\n'
        ),
    )
    table = json.loads(run("sfdisk", "-J", disk.path))["partitiontable"]["partitions"]
    starts = [p["start"] * 512 for p in table]
    make_fat16(d / "p1.img", 16 * MiB, disk.fat_files)
    make_ext4(d / "p2.img", 20 * MiB, disk.ext_files)
    make_ntfs(d / "p3.img", 20 * MiB, disk.ntfs_files)
    for i, start in enumerate(starts, 1):
        disk.part_images[i] = d / f"p{i}.img"
        place(disk.path, d / f"p{i}.img", start)
    return disk


@dataclass
class NbdExport:
    uri: str
    proc: subprocess.Popen[bytes]


def _start_qsd(image: Path, sock: Path, fmt: str = "raw") -> subprocess.Popen[bytes]:
    blockdev = json.dumps(
        {
            "driver": fmt,
            "node-name": "img",
            "read-only": True,
            "file": {"driver": "file", "filename": str(image), "read-only": True, "locking": "off"},
        }
    )
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            blockdev,
            "--nbd-server",
            f"addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=exp,node-name=img,name=disk,writable=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_listening(sock, proc, "qemu-storage-daemon", timeout=15)
    except AssertionError:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture
def qsd_export(tmp_path: Path) -> Iterator[Callable[[Path], NbdExport]]:
    """A factory: ``qsd_export(image)`` exports it read-only, stopped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: Path) -> NbdExport:
        sock = tmp_path / f"nbd{len(procs)}.sock"
        proc = _start_qsd(image, sock)
        procs.append(proc)
        return NbdExport(f"nbd+unix:///disk?socket={sock}", proc)

    try:
        yield start
    finally:
        for p in procs:
            _stop(p)
