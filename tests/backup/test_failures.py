"""Commands that fail before they start leave nothing behind; restore does not overwrite
without --force; -p draws a progress bar."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.backup.helpers import MiB, make_origin, snapimg, snapimg_json
from tests.interop.serving import Serve


def _origin(tmp_path: Path) -> Path:
    return make_origin(tmp_path / "disk.img", 16 * MiB, "write -P 0x21 0 6M")


def _one_line(stderr: str) -> None:
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


def test_a_backup_that_cannot_start_creates_no_directory_and_no_lock(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    new = tmp_path / "new"
    proc = snapimg(
        "backup", "--control", tmp_path / "nobody.sock", "disk", "--to", new, check=False
    )
    assert proc.returncode == 1 and "no snapimg server is running" in proc.stderr
    _one_line(proc.stderr)
    assert not new.exists()

    srv = serve([f"disk={_origin(tmp_path)}"])
    proc = snapimg("backup", "--control", srv.control, "nope", "--to", new, check=False)
    assert proc.returncode == 1
    assert "serves no origin 'nope' (it serves: disk)" in proc.stderr
    _one_line(proc.stderr)
    for bad in (("--keep", "other@x"), ("--since", "a", "--keep", "a")):
        proc = snapimg("backup", "--control", srv.control, "disk", "--to", new, *bad, check=False)
        assert proc.returncode == 1
        _one_line(proc.stderr)
    proc = snapimg("backup", "--control", srv.control, "disk", check=False)  # no --to
    assert proc.returncode == 2
    assert not new.exists()

    # the server refuses the snapshot (its name is taken): the directory this run made is
    # removed again, and the existing snapshot is not dropped
    snapimg("snapshot", "create", "--control", srv.control, "disk@taken")
    proc = snapimg(
        "backup", "--control", srv.control, "disk", "--to", new, "--keep", "disk@taken", check=False
    )
    assert proc.returncode == 1
    _one_line(proc.stderr)
    assert not new.exists()
    names = [s["name"] for s in snapimg_json("snapshot", "list", "--control", srv.control)]
    assert names == ["disk@taken"]

    # an existing directory gets no lock file or note from a failed backup either
    snapimg("backup", "--control", srv.control, "disk", "--to", new)
    before = sorted(p.name for p in new.iterdir())
    for args in (("nope",), ("disk", "--since", "never")):
        proc = snapimg("backup", "--control", srv.control, *args, "--to", new, check=False)
        assert proc.returncode == 1
        assert sorted(p.name for p in new.iterdir()) == before
    # a directory that is not a backup directory is not used
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = snapimg("backup", "--control", srv.control, "disk", "--to", other, check=False)
    assert proc.returncode == 1 and "not a backup directory" in proc.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_restore_refuses_an_existing_file_without_force_and_shows_progress(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    disk = _origin(tmp_path)
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "bk"
    proc = snapimg("backup", "--control", srv.control, "disk", "--to", bk, "-p")
    assert "backup b0001 [########################] 16.0 MiB / 16.0 MiB  100%" in proc.stderr
    assert "\x1b" not in proc.stderr  # not a terminal: no escape sequences
    assert snapimg("backup", "--control", srv.control, "disk", "--to", bk).stderr == ""

    important = tmp_path / "important.txt"
    important.write_text("precious\n")
    proc = snapimg("restore", bk, "--to", important, check=False)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"snapimg restore: {important} exists: restore does not overwrite a file without --force\n"
    )
    assert important.read_text() == "precious\n"
    proc = snapimg("restore", bk, "--to", tmp_path, check=False)
    assert proc.returncode == 1 and "is not a regular file" in proc.stderr

    proc = snapimg("restore", bk, "--to", important, "--force", "--progress")
    assert "restore b0002 [" in proc.stderr
    assert important.read_bytes() == disk.read_bytes()

    # the image being served (QEMU's locks held on it) is refused, even with --force
    before = disk.read_bytes()
    proc = snapimg("restore", bk, "--to", disk, "--force", check=False)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"image {disk} is in use by" in proc.stderr and "snapimg" in proc.stderr
    assert disk.read_bytes() == before


def test_restore_to_a_full_filesystem_fails_in_one_line_and_leaves_nothing(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    srv = serve([f"disk={_origin(tmp_path)}"])
    bk = tmp_path / "bk"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk)
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", small], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        proc = snapimg("restore", bk, "--to", small / "out.img", check=False)
        assert proc.returncode == 1
        assert proc.stderr == (
            "snapimg restore: writing the image failed: No space left on device\n"
        )
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)
