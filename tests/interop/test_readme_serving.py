"""The README's serving and backup examples run as written, by a non-root user, in a fresh
directory."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.interop.serving import bin_dir_for_any_user

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def example(heading: str) -> str:
    """The first ``sh`` block of the README section under ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def as_user(cmd: list[str]) -> list[str]:
    """Run as user nobody when we are root (a user who cannot write to /run)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "nobody", "--", *cmd]


def run_as_user(script: str, work: Path) -> subprocess.CompletedProcess[str]:
    """``script`` by bash -euo pipefail in ``work``, as user nobody when we are root."""
    assert "/run" not in script and "sudo" not in script
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
    bin_dir = bin_dir_for_any_user()  # the venv holding snapimg
    if bin_dir is None:
        pytest.skip("no snapimg installation other users may run (scripts/install.sh makes .venv)")
    env = ["env", f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/nonexistent"]
    return subprocess.run(
        as_user([*env, "bash", "-euo", "pipefail", "-c", script]),
        cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def stop_left_daemon(work: Path) -> None:
    pid_file = work / "serve.pid"
    if pid_file.exists():  # a failed run left the daemon: stop it
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)
        time.sleep(1)
    shutil.rmtree(work, ignore_errors=True)


def wait_stopped(work: Path) -> None:
    deadline = time.monotonic() + 60
    while (work / "serve.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # kill returns at once; the server then shuts down


def test_readme_backup_example() -> None:
    work = Path(tempfile.mkdtemp(prefix="snapimg-readme-"))  # outside root's 0700 tmp_path
    try:
        proc = run_as_user(example("## Backup and restore"), work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "backup b0001 (full)" in proc.stdout
        assert "backup b0002 (incremental over b0001)" in proc.stdout
        wait_stopped(work)
        assert (work / "monday.img").stat().st_size == GiB
        points = sorted(p.name for p in (work / "backups").iterdir())
        assert points == ["b0002.pieces", "b0002.qcow2", "manifest.json"]
    finally:
        stop_left_daemon(work)


def test_readme_serving_example() -> None:
    work = Path(tempfile.mkdtemp(prefix="snapimg-readme-"))  # outside root's 0700 tmp_path
    try:
        proc = run_as_user(example("## Serving images and snapshots over NBD"), work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "Formatting 'disk.img', fmt=raw size=1073741824"
        assert lines[1].startswith(f"snapimg serve: ready socket={work}/disk.nbd ")
        assert f"nbd+unix:///disk@monday?socket={work}/disk.nbd" in lines
        assert "disk@monday" in proc.stdout and "valid" in proc.stdout  # the list
        assert (work / "monday.img").stat().st_size == GiB
        wait_stopped(work)
        assert sorted(p.name for p in work.iterdir()) == ["disk.img", "monday.img", "store"]
        if os.geteuid() == 0:
            owners = {p.stat().st_uid for p in work.rglob("*")}
            assert owners == {pwd.getpwnam("nobody").pw_uid}
    finally:
        stop_left_daemon(work)
