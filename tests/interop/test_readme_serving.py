"""The README's serving example runs as written, by a non-root user, in a fresh directory."""

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


def serving_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving images and snapshots over NBD"):]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def as_user(cmd: list[str]) -> list[str]:
    """Run as user nobody when we are root (a user who cannot write to /run)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "nobody", "--", *cmd]


def test_readme_serving_example(tmp_path: Path) -> None:
    script = serving_example()
    assert "/run" not in script and "sudo" not in script
    work = Path(tempfile.mkdtemp(prefix="snapimg-readme-"))  # outside root's 0700 tmp_path
    try:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(work, nobody.pw_uid, nobody.pw_gid)
        bin_dir = bin_dir_for_any_user()  # the venv holding snapimg
        if bin_dir is None:
            pytest.skip("no snapimg installation other users may run (scripts/install.sh "
                        "makes .venv)")
        env = ["env", f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/nonexistent"]
        proc = subprocess.run(
            as_user([*env, "bash", "-euo", "pipefail", "-c", script]),
            cwd=work, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "Formatting 'disk.img', fmt=raw size=1073741824"
        assert lines[1].startswith(f"snapimg serve: ready socket={work}/disk.nbd ")
        assert f"nbd+unix:///disk@monday?socket={work}/disk.nbd" in lines
        assert "disk@monday" in proc.stdout and "valid" in proc.stdout  # the list
        assert (work / "monday.img").stat().st_size == GiB
        deadline = time.monotonic() + 60
        while (work / "serve.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # kill returns at once; the server then shuts down
        assert sorted(p.name for p in work.iterdir()) == ["disk.img", "monday.img", "store"]
        if os.geteuid() == 0:
            owners = {p.stat().st_uid for p in work.rglob("*")}
            assert owners == {pwd.getpwnam("nobody").pw_uid}
    finally:
        pid_file = work / "serve.pid"
        if pid_file.exists():  # a failed run left the daemon: stop it
            subprocess.run(["kill", pid_file.read_text().strip()], check=False)
            time.sleep(1)
        shutil.rmtree(work, ignore_errors=True)
