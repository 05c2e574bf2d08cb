"""The Linux guest's building blocks that need no VM: manifest verification and cpio archives."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from vmtests import cpio
from vmtests.guests import linux_fs


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


A1, A2, B1 = _h("a1"), _h("a2"), _h("b1")


def test_consistent_state_passes() -> None:
    manifest = [
        f"pending data/f1 {A1}",
        f"done data/f1 {A1}",
        f"pending data/f2 {B1}",
        f"done data/f2 {B1}",
    ]
    verdict = linux_fs.verify(manifest, {"data/f1": A1, "data/f2": B1})
    assert (verdict.done_ops, verdict.files_checked, verdict.problems) == (2, 2, [])


@pytest.mark.parametrize("content", [A1, A2])
def test_operation_in_flight_may_show_old_or_new_content(content: str) -> None:
    manifest = [f"pending data/f1 {A1}", f"done data/f1 {A1}", f"pending data/f1 {A2}"]
    assert linux_fs.verify(manifest, {"data/f1": content}).problems == []


def test_content_matching_no_line_fails() -> None:
    manifest = [f"pending data/f1 {A1}", f"done data/f1 {A1}"]
    problems = linux_fs.verify(manifest, {"data/f1": A2}).problems
    assert problems and "data/f1" in problems[0]


def test_stale_pending_is_not_accepted_after_done() -> None:
    # A2's operation completed: the old content A1 is no longer an allowed state
    manifest = [
        f"pending data/f1 {A1}",
        f"done data/f1 {A1}",
        f"pending data/f1 {A2}",
        f"done data/f1 {A2}",
    ]
    assert linux_fs.verify(manifest, {"data/f1": A1}).problems


def test_missing_done_file_and_unlisted_file_fail() -> None:
    manifest = [f"pending data/f1 {A1}", f"done data/f1 {A1}"]
    problems = linux_fs.verify(manifest, {"data/f9": B1}).problems
    assert any("missing" in p for p in problems)
    assert any("never lists" in p for p in problems)


def test_listing_ignores_a_torn_last_manifest_line() -> None:
    text = (
        f"== manifest\npending data/f1 {A1}\ndone data/f1 {A1}\ndone data/f2 {B1[:20]}"
        f"== files\n{A1}  data/f1\n"
    )
    manifest, files = linux_fs.parse_listing(text)
    assert manifest == [f"pending data/f1 {A1}", f"done data/f1 {A1}"]
    assert files == {"data/f1": A1}
    assert linux_fs.verify(manifest, files).problems == []


def test_cpio_archive_unpacks_with_gnu_cpio(tmp_path: Path) -> None:
    entries = [
        cpio.directory("etc"),
        cpio.regular("etc/hello", b"hello\n", 0o600),
        cpio.regular("odd", b"x" * 5),
        cpio.symlink("link", "etc/hello"),
    ]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.archive(entries))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "-F", str(archive)], cwd=out, check=True)
    assert (out / "etc/hello").read_bytes() == b"hello\n"
    assert (out / "etc/hello").stat().st_mode & 0o777 == 0o600
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert (out / "link").readlink() == Path("etc/hello")


def test_cpio_carries_no_timestamps() -> None:
    data = cpio.gzipped([cpio.directory("d"), cpio.regular("d/f", b"data")])
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME
    raw = cpio.archive([cpio.regular("f", b"data")])
    assert raw[:6] == b"070701" and raw[6 + 5 * 8 : 6 + 6 * 8] == b"0" * 8  # newc mtime
