"""`snapimg serve --cbw-timeout` with its store on a frozen XFS: an NBD client's write
that needs a copy fails (EIO) instead of hanging, others go on, and the snapshot is
exact or visibly invalid after the thaw; bad values and the qsd backend are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.interop.qemu_tools import qemu_io
from tests.interop.serving import Serve, snapimg
from tests.interop.test_serve_cli import image, one_line_error

MiB = 1 << 20


def test_frozen_store_fails_writes_in_time(tmp_path: Path, loop_xfs: Path) -> None:
    disk = image(tmp_path / "disk.img", 8 * MiB)
    s = Serve(tmp_path, [f"disk={disk}"], "--cbw-timeout", "1", store=loop_xfs / "store")
    try:
        snapimg("snapshot", "create", "--control", s.control, "disk@s")
        uri = f"nbd+unix:///disk?socket={s.socket}"
        snap = f"nbd+unix:///disk@s?socket={s.socket}"
        qemu_io(uri, "write -P 0x22 0 64k")  # preserved before the freeze
        subprocess.run(["fsfreeze", "-f", str(loop_xfs)], check=True)
        try:
            out = qemu_io(uri, "write -P 0x33 1M 64k", check=False)
            assert "write failed: Input/output error" in out, out
            qemu_io(uri, "write -P 0x44 0 4k")  # needs no copy: goes on
        finally:
            subprocess.run(["fsfreeze", "-u", str(loop_xfs)], check=True)
        qemu_io(uri, "read -P 0x11 1M 64k")  # the failed write did not reach the origin
        listed = snapimg("snapshot", "list", "--control", s.control, "--json").stdout
        if '"state": "valid"' in listed:
            qemu_io(snap, "read -P 0x11 0 8M", read_only=True)
        else:
            assert "cbw-timeout" in listed
    finally:
        assert s.stop() == 143
        s.kill()


def test_cbw_timeout_mistakes(tmp_path: Path) -> None:
    disk = image(tmp_path / "disk.img", 1 * MiB)
    base = ["serve", f"disk={disk}", "--socket", tmp_path / "s", "--control", tmp_path / "c",
            "--store-dir", tmp_path / "store"]  # fmt: skip
    for value in ("0", "-1", "4000"):
        one_line_error(snapimg(*base, "--cbw-timeout", value, check=False), "--cbw-timeout")
    one_line_error(
        snapimg(*base, "--cbw-timeout", "1", "--backend", "qsd", check=False),
        "--cbw-timeout needs the native backend",
    )
    assert not (tmp_path / "store").exists()
