"""The digest rule, the manifest, the piece digest file, the directory lock, and the
version-1 incremental format and chain overlay, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from snapimg.backup import chain, incfile, manifest, piecefile
from snapimg.backup.manifest import BackupRecord
from snapimg.digest import PIECE_SIZE, PieceDigests, PiecePlan, ZeroSpan, split_pieces
from snapimg.errors import BackupError


def _record(i: int, parent: str | None) -> BackupRecord:
    return BackupRecord(
        id=f"b{i:04d}",
        parent=parent,
        kind="full" if parent is None else "incremental",
        origin="disk",
        snapshot=f"disk@s{i}",
        created="2026-01-01T00:00:00+00:00",
        file=f"b{i:04d}.qcow2",
        size=1 << 20,
        block_size=65536,
        bytes_written=0,
        digest=f"{i:064x}",
        pieces=f"b{i:04d}.pieces",
    )


@pytest.mark.parametrize("size", [0, 1, 4096, PIECE_SIZE, PIECE_SIZE + 1, 3 * PIECE_SIZE + 12345])
def test_image_digest_follows_the_rule(size: int) -> None:
    """The digest of sparse piece digests equals the rule applied to every byte."""
    rng = random.Random(size)
    data = bytearray(size)
    for _ in range(3 if size > 10 else 0):
        data[rng.randrange(size)] = rng.randrange(1, 256)
    digests = PieceDigests(size)
    outer = hashlib.sha256()
    for i in range(0, size, PIECE_SIZE):
        d = hashlib.sha256(data[i : i + PIECE_SIZE]).digest()
        outer.update(d)
        digests.set(i // PIECE_SIZE, d)
    assert digests.image_digest() == outer.hexdigest()
    assert len(digests.nonzero()) == len({i // PIECE_SIZE for i, b in enumerate(data) if b})


def test_split_pieces_gives_whole_zero_pieces_as_one_span() -> None:
    p = PIECE_SIZE
    runs = [(0, 100, True), (100, p - 100, False), (p, 5 * p + 7, True), (6 * p + 7, 9, False)]
    items = list(split_pieces(runs))
    assert items[0] == PiecePlan(0, 0, p, [(0, 100, True), (100, p - 100, False)])
    assert items[1] == ZeroSpan(1, 5, p, 5 * p)
    assert items[2] == PiecePlan(6, 6 * p, 16, [(6 * p, 7, True), (6 * p + 7, 9, False)])
    assert len(items) == 3


def test_piece_file_round_trip_and_damage(tmp_path: Path) -> None:
    digests = PieceDigests(10 * PIECE_SIZE + 5)
    digests.set(3, b"\x01" * 32)
    digests.set(10, b"\x02" * 32)
    path = tmp_path / "b0001.pieces"
    piecefile.write(path, digests)
    assert piecefile.read(path) == digests
    assert path.stat().st_size == 40 + 2 * 40 + 32
    raw = bytearray(path.read_bytes())
    raw[50] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BackupError, match="damaged"):
        piecefile.read(path)


def test_manifest_round_trip_and_next_id(tmp_path: Path) -> None:
    assert manifest.load(tmp_path).backups == []
    m = manifest.Manifest([_record(1, None), _record(2, "b0001")])
    manifest.save(tmp_path, m)
    obj = json.loads((tmp_path / "manifest.json").read_text())
    assert obj["version"] == 2
    assert obj["digest_rule"] == {"name": "sha256-pieces", "piece_size": 4194304}
    assert [b["id"] for b in obj["backups"]] == ["b0001", "b0002"]
    assert "sha256" not in obj["backups"][0]  # only written when asked for
    assert manifest.load(tmp_path).backups == m.backups
    assert m.next_id() == "b0003"
    assert not list(tmp_path.glob(".*tmp"))


def test_manifest_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BackupError, match="not valid JSON"):
        manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"backups": [{"id": "b0001"}]}')
    with pytest.raises(BackupError, match="b0001"):
        manifest.load(tmp_path)
    obj = {
        "format": "snapimg-backup",
        "version": 2,
        "digest_rule": {"name": "sha256-pieces", "piece_size": 65536},
        "backups": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(BackupError, match="unsupported digest_rule"):
        manifest.load(tmp_path)


def test_directory_lock_is_exclusive_and_leaves_no_file(tmp_path: Path) -> None:
    with manifest.locked(tmp_path):
        assert (tmp_path / ".lock").exists()
        with pytest.raises(BackupError, match="in use"), manifest.locked(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()
    with manifest.locked(tmp_path):  # and it can be taken again
        pass


def test_incremental_table_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "b0002.inc"
    size = (1 << 20) + 512  # not 4 KiB aligned: the table starts at the next 4 KiB
    table = incfile.IncTable(size, 65536, [(0, 65536)], [(131072, 65536)])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size)
    incfile.write_table(fd, table)
    os.close(fd)
    got = incfile.read_table(path)
    assert got == table
    assert got.overrides() == [(0, 65536, True), (131072, 65536, False)]
    raw = bytearray(path.read_bytes())
    raw[incfile.table_offset(size) + 3] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(BackupError, match="checksum"):
        incfile.read_table(path)


def test_overlay_splits_and_merges() -> None:
    a, b = Path("a"), Path("b")
    base = [chain.Segment(0, 100, a)]
    out = chain.overlay(base, [(10, 10, True), (20, 5, False), (90, 10, True)], b, 100)
    assert out == [
        chain.Segment(0, 10, a),
        chain.Segment(10, 10, b),
        chain.Segment(20, 5, None),
        chain.Segment(25, 65, a),
        chain.Segment(90, 10, b),
    ]
    again = chain.overlay(out, [(5, 30, False)], a, 100)
    assert again == [
        chain.Segment(0, 5, a),
        chain.Segment(5, 30, None),
        chain.Segment(35, 55, a),
        chain.Segment(90, 10, b),
    ]
