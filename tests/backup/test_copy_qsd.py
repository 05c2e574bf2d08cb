"""The sparse NBD copy against qemu-storage-daemon's NBD server (a server we did not write)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from snapimg.backup.copy import NbdSource, copy_ranges
from tests.backup.helpers import allocated_bytes

MiB = 1 << 20
SIZE = 16 * MiB


def _image(path: Path) -> bytes:
    """Random data, a pattern, allocated zeroes and holes."""
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(os.urandom(MiB + 4096))  # runs past a request boundary
        f.seek(4 * MiB + 512)
        f.write(b"\x5a" * 65536)
        f.seek(8 * MiB)
        f.write(bytes(MiB))  # allocated, but zero: read, not written
        f.seek(SIZE - 4096)
        f.write(b"\xee" * 4096)
    return path.read_bytes()


def _fresh(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return fd


def test_full_copy_is_exact_and_sparse(tmp_path: Path,
                                       qsd_export: Callable[[Path], str]) -> None:
    image = tmp_path / "src.img"
    content = _image(image)
    out = tmp_path / "out.raw"
    with NbdSource(qsd_export(image)) as src:
        assert src.size == SIZE
        fd = _fresh(out, SIZE)
        try:
            # small requests so that many are in flight and complete out of order
            res = copy_ranges(src, fd, [(0, SIZE)], hash_stream=True,
                              request_size=256 << 10, depth=6)
        finally:
            os.close(fd)
    assert out.read_bytes() == content
    assert res.sha256 == hashlib.sha256(content).hexdigest()
    assert res.bytes_read + res.bytes_skipped == SIZE
    assert res.bytes_skipped >= SIZE - 4 * MiB  # holes were never read
    assert res.bytes_zero_read >= MiB - 64 * 1024  # the allocated zeroes were not written
    assert res.bytes_written == sum(n for _, n in res.data)
    assert allocated_bytes(out) <= res.bytes_written + 64 * 1024
    assert allocated_bytes(out) < allocated_bytes(image)


def test_range_copy_classifies_data_and_zero(tmp_path: Path,
                                             qsd_export: Callable[[Path], str]) -> None:
    image = tmp_path / "src.img"
    content = _image(image)
    ranges = [(512 * 1024, 64 * 1024), (4 * MiB, MiB), (8 * MiB, 128 * 1024),
              (12 * MiB, 64 * 1024)]
    out = tmp_path / "out.raw"
    with NbdSource(qsd_export(image)) as src:
        fd = _fresh(out, SIZE)
        try:
            res = copy_ranges(src, fd, ranges, hash_stream=False)
        finally:
            os.close(fd)
    assert res.sha256 is None
    got = out.read_bytes()
    covered = 0
    for off, n in ranges:
        assert got[off:off + n] == content[off:off + n]
        covered += n
    data_bytes = sum(n for _, n in res.data)
    zero_bytes = sum(n for _, n in res.zero)
    assert data_bytes + zero_bytes == covered
    assert (512 * 1024, 64 * 1024) in res.data
    # the pattern sits inside [4M, 5M): data; [8M, 8M+128K) and [12M, +64K) read as zero
    assert all(content[o:o + n].count(0) == n for o, n in res.zero)
    assert any(o <= 4 * MiB + 512 < o + n for o, n in res.data)
    # nothing outside the ranges was written
    assert got[MiB + 4096:4 * MiB] == bytes(3 * MiB - 4096)
