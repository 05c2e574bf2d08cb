"""QEMU's image-fleecing cases against snapimg serve, with qemu-io, qemu-img and libnbd tools.

The snapshot must keep showing the image as it was when it was taken, whatever the
writer does afterwards (overwrites of whole or partial blocks, write-zeroes, discard),
including for reads that start inside a rewritten block and run past it.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from snapimg.units import parse_size
from tests.interop.qemu_tools import qemu_io, run
from tests.interop.serving import Serve, snapimg

SIZE = 64 << 20
# (pattern, offset, length) as in qemu-iotests tests/image-fleecing
PATTERNS = [
    ("0x5d", "0", "64k"),
    ("0xd5", "1M", "64k"),
    ("0xdc", "32M", "64k"),
    ("0xcd", "0x3ff0000", "64k"),
    ("0x77", "8M", "256k"),
]
OVERWRITE = [
    ("0xab", "0", "64k"),  # full overwrite
    ("0xad", "0x00f8000", "64k"),  # partial-left
    ("0x1d", "0x2008000", "64k"),  # partial-right
    ("0xea", "0x3fe0000", "64k"),  # adjacent-left
    ("0x99", "0x810000", "64k"),
]  # one block inside the 0x77 run
ZEROES = [("0", "0x00f8000", "32k"), ("0", "0x2010000", "32k"), ("0", "0x3fe0000", "64k")]
REMAINDER = [("0xd5", "0x108000", "32k"), ("0xdc", "32M", "32k"), ("0xcd", "0x3ff0000", "64k")]


def _offset(text: str) -> int:
    return int(text, 0) if text[-1].isdigit() else parse_size(text)


def make_image(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(SIZE)
    cmds = [f"write -P {p} {o} {n}" for p, o, n in PATTERNS]
    run("qemu-io", "-f", "raw", *sum((["-c", c] for c in cmds), []), str(path))


def test_fleecing_cases(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    image = tmp_path / "disk.img"
    make_image(image)
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(image, pristine)
    s = serve([str(image)])
    uri = snapimg("snapshot", "create", "--control", s.control, "disk@s1").stdout.strip()
    assert uri == s.uri("disk@s1")

    # The writer: overwrites, then zeroes and discards after the snapshot.
    qemu_io(s.uri("disk"), *[f"write -P {p} {o} {n}" for p, o, n in OVERWRITE])
    qemu_io(s.uri("disk"), *[f"write -z {o} {n}" for _, o, n in ZEROES])
    qemu_io(
        s.uri("disk"),
        "write -P 0x42 20M 64k",
        "write -z 1M 32k",
        "discard 0x830000 64k",
        "write -z -u 0x3ff0000 64k",
    )

    # The snapshot still reads the original patterns and zeroes.
    snap = s.uri("disk@s1")
    qemu_io(snap, *[f"read -P {p} {o} {n}" for p, o, n in PATTERNS], read_only=True)
    qemu_io(snap, *[f"read -P 0 {o} {n}" for _, o, n in ZEROES[:2]], read_only=True)
    # Reads starting inside a block rewritten after the snapshot and running past it.
    qemu_io(
        snap,
        "read -P 0x77 0x818000 160k",
        "read -P 0xd5 0x104000 48k",
        "read -P 0 0x13f8000 96k",
        "read -P 0 0x1400000 64k",
        "read -P 0 0x13f0000 192k",
        "read -P 0 0x840000 64k",
        "read -P 0xcd 0x3ff0000 64k",
        read_only=True,
    )
    # The origin reads the new data.
    qemu_io(
        s.uri("disk"),
        *[f"read -P {p} {o} {n}" for p, o, n in REMAINDER[:2]],
        "read -P 0 0x3ff0000 64k",
        "read -P 0 0x830000 64k",
        "read -P 0xab 0 64k",
        "read -P 0x99 0x810000 64k",
        "read -P 0x42 20M 64k",
        "read -P 0 1M 32k",
    )

    # Whole-image copies with three different clients match the pristine image.
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", snap, str(copy))
    assert filecmp.cmp(copy, pristine, shallow=False)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", snap, str(pristine))
    ncopy = tmp_path / "nbdcopy.raw"
    run("nbdcopy", snap, str(ncopy))
    assert filecmp.cmp(ncopy, pristine, shallow=False)
    run("nbdcopy", "--no-extents", snap, str(ncopy))
    assert filecmp.cmp(ncopy, pristine, shallow=False)
    assert (
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri("disk"), str(image)).returncode
        == 0
    )

    # Block status of the snapshot describes the snapshot, not the origin: ranges the
    # writer zeroed or discarded after the snapshot still hold data in the snapshot.
    snap_map = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", snap).stdout)

    def entry(offset: int) -> dict[str, object]:
        return next(e for e in snap_map if e["start"] <= offset < e["start"] + e["length"])

    for offset in (1 << 20, 0x830000, 0x3FF0000, 0x2010000 - 4096):
        assert entry(offset)["data"] is True and entry(offset)["zero"] is False, offset
    for _, o, _n in PATTERNS:
        assert entry(_offset(o))["zero"] is False
    origin_map = json.loads(
        run("qemu-img", "map", "--output=json", "-f", "raw", s.uri("disk")).stdout
    )
    assert any(e["zero"] for e in origin_map if e["start"] <= 0x3FF0000 < e["start"] + e["length"])

    listing = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={s.socket}").stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {"disk", "disk@s1"}
    assert exports["disk@s1"]["is_read_only"] is True
    assert exports["disk"]["is_read_only"] is False
    nmap = run("nbdinfo", "--map", snap).stdout
    assert "data" in nmap and "hole" in nmap
    assert s.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
