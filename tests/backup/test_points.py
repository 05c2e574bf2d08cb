"""Backup points opened by a stock QEMU (``-drive file=DIR/<id>.qcow2,snapshot=on``) and by
snapimg's own readers (``ls``, ``cat``, ``inspect`` with a backup point as TARGET)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.backup.helpers import MiB, make_origin, qemu_io, sha256_file, snapimg
from tests.inspect.helpers import make_ext4
from tests.interop.serving import Serve

SIZE = 32 * MiB


def _hmp(drive: Path, *commands: str) -> str:
    """Run HMP commands in a qemu-system-x86_64 that opened ``drive`` with snapshot=on."""
    script = "".join(f"{c}\n" for c in commands) + "quit\n"
    proc = subprocess.run(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-drive",
            f"file={drive},format=qcow2,if=none,id=d0,snapshot=on",
            "-monitor",
            "stdio",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_qemu_opens_a_point_with_snapshot_on(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    disk = make_origin(tmp_path / "disk.img", SIZE, "write -P 0x61 0 2M", "write -P 0x62 20M 1M")
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "bk"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@a")
    qemu_io(srv.uri("disk"), "write -P 0x63 1M 64k", "write -z 20M 64k")
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "a")
    point = bk / "b0002.qcow2"
    before = {p.name: sha256_file(p) for p in bk.iterdir()}

    out = _hmp(
        point,
        'qemu-io d0 "read -P 0x61 0 1M"',
        'qemu-io d0 "read -P 0x63 1M 64k"',  # from the incremental itself
        'qemu-io d0 "read -P 0 20M 64k"',  # zeroed there, not the parent's 0x62
        'qemu-io d0 "read -P 0x62 20544k 64k"',  # the parent's (backing file)
        'qemu-io d0 "write -P 0x7f 0 64k"',  # snapshot=on: goes to a temporary
        'qemu-io d0 "read -P 0x7f 0 64k"',
    )
    assert "Pattern verification failed" not in out
    assert out.count("read 65536/65536 bytes") == 4 and "read 1048576/1048576 bytes" in out
    assert {p.name: sha256_file(p) for p in bk.iterdir()} == before
    assert snapimg("verify", bk).returncode == 0
    # and a wrong expectation does fail (the check above can fail)
    assert "Pattern verification failed" in _hmp(point, 'qemu-io d0 "read -P 0x62 20M 4k"')


def test_ls_cat_inspect_read_backup_points(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    first = tmp_path / "first.img"
    make_ext4(first, SIZE, {"etc/motd": b"first version\n", "data/a.bin": bytes(range(256))})
    second = tmp_path / "second.img"
    make_ext4(second, SIZE, {"etc/motd": b"second version\n", "new.txt": b"hello\n"})
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", first, disk], check=True)
    srv = serve([f"disk={disk}"])
    bk = tmp_path / "bk"
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--keep", "disk@a")
    subprocess.run(["nbdcopy", second, srv.uri("disk")], check=True)
    snapimg("backup", "--control", srv.control, "disk", "--to", bk, "--since", "a")

    assert snapimg("cat", bk, "--backup", "b0001", "/etc/motd").stdout == "first version\n"
    assert snapimg("cat", bk, "/etc/motd").stdout == "second version\n"  # the newest
    names = {e["name"] for e in json.loads(snapimg("ls", bk, "/", "--json").stdout)["entries"]}
    assert {"etc", "new.txt"} <= names and "data" not in names
    old = json.loads(snapimg("ls", bk, "/data", "--backup", "b0001", "--json").stdout)
    assert [(e["name"], e["size"]) for e in old["entries"]] == [("a.bin", 256)]
    rep = json.loads(snapimg("inspect", bk, "--backup", "b0001", "--json").stdout)
    assert rep["backup"] == "b0001" and rep["format"] == "qcow2"
    assert rep["filesystem"]["type"] == "ext4" and rep["virtual_size"] == SIZE
    text = snapimg("inspect", bk).stdout
    assert "(backup point b0002)" in text
    proc = snapimg("ls", bk, "/", "--backup", "b0009", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "snapimg ls: no backup 'b0009' (the directory has: b0001, b0002)\n"
    proc = snapimg("cat", disk, "--backup", "b0001", "/etc/motd", check=False)
    assert proc.returncode == 1 and "not a backup directory" in proc.stderr
