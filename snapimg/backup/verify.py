"""``snapimg verify``: recompute every point's digest from its files, and check them.

Each qcow2 file is checked by ``qemu-img check``, and each point is read through QEMU
(which follows the backing files) and hashed: holes and zero ranges cost nothing.  A
point whose backing file is the point before it in the chain inherits that point's
*recomputed* piece digests and hashes again only the pieces its own file holds
(``qemu:allocation-depth`` 1): every data cluster of every file is read once, so a
flipped byte anywhere in a backup's data changes the digest of the point that shows it.
A point whose backing file is not a listed point (a prune that was interrupted) is
hashed whole.  Version-1 directories are checked against their whole-image sha256.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapimg.backup import chain, manifest, points, qemuimg
from snapimg.backup.manifest import BackupRecord, Manifest
from snapimg.backup.ranges import piece_regions
from snapimg.digest import PIECE_SIZE, PieceDigests
from snapimg.errors import BackupError, QemuError


@dataclass
class PointReport:
    id: str
    file: str
    expected: str
    digest: str | None = None  # recomputed
    check: qemuimg.CheckResult | None = None
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return f"{self.id}: {'; '.join(self.problems)}" if self.problems else f"{self.id}: ok"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "file": self.file,
            "ok": self.ok,
            "digest": self.digest,
            "expected": self.expected,
            "qemu_img_check": self.check.to_json() if self.check else None,
            "problems": self.problems,
            "bytes_read": self.bytes_read,
            "duration": round(self.duration, 3),
        }


def verify(directory: Path, backup_id: str | None = None) -> list[PointReport]:
    """Reports for every point (or ``backup_id`` alone); raises only when the directory
    itself cannot be used."""
    if not (directory / manifest.MANIFEST_NAME).is_file():
        raise BackupError(f"{directory} is not a backup directory (no manifest.json)")
    man = manifest.load(directory)
    wanted = [man.get(backup_id)] if backup_id is not None else list(man.backups)
    if man.legacy:
        return [_verify_legacy(directory, man, rec) for rec in wanted]
    return _Verifier(directory, man).run(wanted)


class _Verifier:
    def __init__(self, directory: Path, man: Manifest) -> None:
        self.directory = directory
        self.man = man
        self.by_file = {r.file: r for r in man.backups}
        self.computed: dict[str, PieceDigests | None] = {}  # None: could not be computed
        self._backings: dict[str, BackupRecord | None] = {}
        self._backing_names: dict[str, str | None] = {}

    def run(self, wanted: list[BackupRecord]) -> list[PointReport]:
        reports: dict[str, PointReport] = {}
        for rec in self._order(wanted):
            reports[rec.id] = self._point(rec)
        return [reports[r.id] for r in wanted]

    def _backing(self, rec: BackupRecord) -> BackupRecord | None:
        """The listed point whose file is ``rec``'s backing file, if any."""
        if rec.id not in self._backings:
            name = qemuimg.backing_file(self.directory / rec.file)
            self._backing_names[rec.id] = name
            self._backings[rec.id] = self.by_file.get(name) if name else None
        return self._backings[rec.id]

    def _order(self, wanted: list[BackupRecord]) -> list[BackupRecord]:
        """``wanted`` and the points they inherit from, each after its backing point."""
        out: list[BackupRecord] = []
        seen: set[str] = set()

        def visit(rec: BackupRecord, depth: int) -> None:
            if rec.id in seen or depth > len(self.man.backups):
                return
            seen.add(rec.id)
            back = None
            if (self.directory / rec.file).is_file():
                with contextlib.suppress(QemuError):  # reported by _point
                    back = self._backing(rec)
            if back is not None:
                visit(back, depth + 1)
            out.append(rec)

        for rec in wanted:
            visit(rec, 0)
        return out

    def _point(self, rec: BackupRecord) -> PointReport:
        t0 = time.monotonic()
        assert rec.digest is not None
        report = PointReport(rec.id, rec.file, rec.digest)
        self.computed[rec.id] = None
        path = self.directory / rec.file
        if not path.is_file():
            report.problems.append(f"file {rec.file} is missing")
            return report
        try:
            report.check = qemuimg.check(path)
            if not report.check.ok:
                report.problems.append(f"qemu-img check: {report.check.message}")
            back = self._backing(rec)
            if rec.parent is not None and (back is None or back.id != rec.parent):
                name = self._backing_names.get(rec.id) or "none"
                report.problems.append(
                    f"its backing file is {name}, not the file of its parent {rec.parent}"
                )
            base = self.computed.get(back.id) if back is not None else None
            if back is not None and base is None:
                report.problems.append(f"its backing point {back.id} could not be read")
                return report
            with points.opened(self.directory, rec, allocation_depth=base is not None) as rd:
                regions = (
                    None if base is None else piece_regions(rd.top_ranges(0, rec.size), rec.size)
                )
                result = points.scan(rd, regions)
        except (BackupError, QemuError) as err:
            report.problems.append(str(err))
            return report
        digests = points.digests_of(rec.size, result, base)
        self.computed[rec.id] = digests
        report.digest = digests.image_digest()
        report.bytes_read = result.bytes_read
        if report.digest != rec.digest:
            report.problems.append(
                f"digest {report.digest} does not match the manifest's "
                f"{rec.digest}{_first_bad(self.directory, rec, digests)}"
            )
        else:
            try:
                points.stored_pieces(self.directory, rec)
            except BackupError as err:
                report.problems.append(f"piece digest file: {err}")
        report.duration = time.monotonic() - t0
        return report


def _first_bad(directory: Path, rec: BackupRecord, digests: PieceDigests) -> str:
    try:
        stored = points.stored_pieces(directory, rec)
    except BackupError:
        return ""
    first = digests.first_difference(stored)
    return "" if first is None else f" (first in the piece at offset {first * PIECE_SIZE})"


def _verify_legacy(directory: Path, man: Manifest, rec: BackupRecord) -> PointReport:
    """A version-1 point: the whole-image sha256 of its raw/.inc chain."""
    t0 = time.monotonic()
    assert rec.sha256 is not None
    report = PointReport(rec.id, rec.file, rec.sha256)
    try:
        segments = chain.image_map(directory, chain.resolve(directory, man, rec.id))
        report.digest = chain.hash_segments(segments)
    except BackupError as err:
        report.problems.append(str(err))
    else:
        if report.digest != rec.sha256:
            report.problems.append(
                f"sha256 {report.digest} does not match the manifest's {rec.sha256}"
            )
    report.duration = time.monotonic() - t0
    return report
