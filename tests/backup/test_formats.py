"""Manifest and incremental file formats, and the chain overlay, on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from snapimg.backup import chain, incfile, manifest
from snapimg.backup.manifest import BackupRecord
from snapimg.errors import BackupError


def _record(i: int, parent: str | None) -> BackupRecord:
    return BackupRecord(id=f"b{i:04d}", parent=parent,
                        kind="full" if parent is None else "incremental", origin="disk",
                        snapshot=f"disk@s{i}", created="2026-01-01T00:00:00+00:00",
                        file=f"b{i:04d}.raw", size=1 << 20, block_size=65536,
                        bytes_written=0, sha256="0" * 64)


def test_manifest_round_trip_and_next_id(tmp_path: Path) -> None:
    assert manifest.load(tmp_path).backups == []
    m = manifest.Manifest([_record(1, None), _record(2, "b0001")])
    manifest.save(tmp_path, m)
    obj = json.loads((tmp_path / "manifest.json").read_text())
    assert [b["id"] for b in obj["backups"]] == ["b0001", "b0002"]
    for key in ("id", "parent", "snapshot", "created", "file", "bytes_written", "sha256"):
        assert key in obj["backups"][1]
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


def test_directory_lock_is_exclusive(tmp_path: Path) -> None:
    with manifest.locked(tmp_path), pytest.raises(BackupError, match="in use"), \
            manifest.locked(tmp_path):
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
    assert out == [chain.Segment(0, 10, a), chain.Segment(10, 10, b),
                   chain.Segment(20, 5, None), chain.Segment(25, 65, a),
                   chain.Segment(90, 10, b)]
    again = chain.overlay(out, [(5, 30, False)], a, 100)
    assert again == [chain.Segment(0, 5, a), chain.Segment(5, 30, None),
                     chain.Segment(35, 55, a), chain.Segment(90, 10, b)]
