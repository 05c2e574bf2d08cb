"""The piece pipeline against qemu-storage-daemon's NBD server (a server we did not write):
exact copies into a raw file and into qcow2 overlays written by QEMU, and digests equal to
the rule computed independently."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from snapimg.backup.nbdread import NbdReader
from snapimg.backup.pipeline import FileSink, NbdSink, plan_jobs, run_pipeline
from snapimg.backup.points import digests_of
from snapimg.backup.ranges import piece_regions
from snapimg.qemuexport import QemuExport
from tests.backup.helpers import PIECE, MiB, allocated_bytes, pieces_digest_file

SIZE = 5 * PIECE + 3 * MiB + 4096  # the last piece is short and not MiB-aligned


def _image(path: Path) -> bytes:
    """Random data across piece boundaries, a pattern, allocated zeroes and holes."""
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(PIECE - MiB)
        f.write(os.urandom(2 * MiB + 4096))  # ends inside piece 1
        f.seek(3 * PIECE + 512)
        f.write(b"\x5a" * 65536)
        f.seek(4 * PIECE)
        f.write(bytes(PIECE))  # allocated, but zero: read, hashed as zeroes, not written
        f.seek(SIZE - 4096)
        f.write(b"\xee" * 4096)
    return path.read_bytes()


def test_full_copy_to_a_file_is_exact_sparse_and_hashed_by_the_rule(
    tmp_path: Path, qsd_export: Callable[[Path], str]
) -> None:
    image = tmp_path / "src.img"
    content = _image(image)
    out = tmp_path / "out.raw"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    try:
        with NbdReader(qsd_export(image), connections=3) as reader:
            assert reader.size == SIZE
            # few buffers and workers: pieces complete out of order and wait for buffers
            res = run_pipeline(
                reader,
                plan_jobs(reader, [(0, SIZE)]),
                FileSink(fd),
                whole_sha256=True,
                workers=3,
                max_pieces=2,
            )
    finally:
        os.close(fd)
    assert out.read_bytes() == content
    assert res.sha256 == hashlib.sha256(content).hexdigest()
    assert digests_of(SIZE, res).image_digest() == pieces_digest_file(image)
    assert res.bytes_read + res.bytes_skipped == SIZE
    assert res.bytes_skipped >= 2 * PIECE  # pieces 2 and (most of) 3 are holes
    assert res.bytes_written < 3 * MiB  # the allocated zero piece was not written
    assert allocated_bytes(out) <= res.bytes_written + 65536


def test_overlay_takes_exactly_the_written_ranges(
    tmp_path: Path, qsd_export: Callable[[Path], str]
) -> None:
    """Writes into a qcow2 overlay through QEMU: data ranges and zero ranges override the
    backing file, everything else still reads from it."""
    new = tmp_path / "new.img"
    content = bytearray(_image(new))
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 0 {SIZE}", base],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    top = tmp_path / "top.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
            str(SIZE),
        ],
        check=True,
    )
    writes = [
        (PIECE - MiB, 65536),
        (2 * PIECE, 65536),
        (4 * PIECE + 4096, 8192),
        (SIZE - 8192, 8192),
    ]  # data, a hole, allocated zeroes, half data half zero
    with (
        NbdReader(qsd_export(new)) as reader,
        QemuExport(top, "qcow2", writable=True, no_flush=True) as exp,
    ):
        sink = NbdSink(exp.uri, "write")
        regions = piece_regions(writes, SIZE)
        res = run_pipeline(reader, plan_jobs(reader, regions, writes), sink)
        sink.flush()
        sink.close()
        exp.close()
    expected = bytearray(b"\x77" * SIZE)
    for off, n in writes:
        expected[off : off + n] = content[off : off + n]
    got = tmp_path / "got.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", top, "-O", "raw", got], check=True)
    assert got.read_bytes() == bytes(expected)
    # the visited pieces were hashed whole, from the new image
    for index, digest in res.digests.items():
        piece = content[index * PIECE : (index + 1) * PIECE]
        assert digest == hashlib.sha256(piece).digest()
    assert sorted(res.digests) == [0, 4, 5]  # piece 2 is a hole: not read, not hashed
    assert res.zero_spans == [(2, 1)]
