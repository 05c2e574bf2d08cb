"""The ``sha256-pieces`` image digest (docs/backup.md, "Digest rule").

The image is cut into pieces of ``piece_size`` bytes (4 MiB; the last piece is shorter when
the size is not a multiple).  A piece's digest is the SHA-256 of its bytes; the image digest
is the SHA-256 of the concatenation of all piece digests in order (32 raw bytes each).

An all-zero piece has a digest that depends only on its length, so :class:`PieceDigests`
stores only the pieces that are not all zero: holes cost nothing to hash, to keep or to
combine, and an incremental backup replaces the digests of the pieces it changed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

RULE_NAME = "sha256-pieces"
PIECE_SIZE = 4 << 20
DIGEST_SIZE = 32

_ZERO = memoryview(bytes(PIECE_SIZE))
Run = tuple[int, int, bool]  # offset, length, zero


def rule_json(piece_size: int = PIECE_SIZE) -> dict[str, object]:
    return {"name": RULE_NAME, "piece_size": piece_size}


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The digest of a piece of ``length`` zero bytes."""
    h = hashlib.sha256()
    while length > 0:
        n = min(length, len(_ZERO))
        h.update(_ZERO[:n])
        length -= n
    return h.digest()


def hash_zeroes(h: hashlib._Hash, length: int) -> None:
    """Feed ``length`` zero bytes into ``h`` (they cost what data costs: SHA-256 is serial)."""
    while length > 0:
        n = min(length, len(_ZERO))
        h.update(_ZERO[:n])
        length -= n


def piece_count(size: int, piece_size: int = PIECE_SIZE) -> int:
    return (size + piece_size - 1) // piece_size


@dataclass(frozen=True, slots=True)
class PiecePlan:
    """One piece: its index, extent, and its runs (offset, length, zero) covering it."""

    index: int
    offset: int
    length: int
    runs: list[Run]

    @property
    def all_zero(self) -> bool:
        return all(zero for _, _, zero in self.runs)


@dataclass(frozen=True, slots=True)
class ZeroSpan:
    """Consecutive whole pieces that read as zeroes: nothing to read or hash."""

    index: int  # of the first piece
    count: int
    offset: int
    length: int


def split_pieces(
    runs: Iterable[Run], piece_size: int = PIECE_SIZE
) -> Iterator[PiecePlan | ZeroSpan]:
    """Cut (offset, length, zero) runs covering whole pieces, in order, into pieces; whole
    pieces inside a zero run come as one :class:`ZeroSpan` (a 10 TiB hole is one item).

    The runs must start on a piece boundary and be contiguous; a piece ends at the end of
    the runs only when the image ends there (the last, shorter piece).
    """
    cur: list[Run] = []
    start = -1
    for off, n, zero in runs:
        if start < 0:
            start = off - off % piece_size
        end_run = off + n
        while off < end_run:
            if zero and not cur and end_run - off >= piece_size:
                count = (end_run - off) // piece_size
                yield ZeroSpan(off // piece_size, count, off, count * piece_size)
                off += count * piece_size
                start = off
                continue
            end = start + piece_size
            k = min(end_run, end) - off
            cur.append((off, k, zero))
            off += k
            if off == end:
                yield PiecePlan(start // piece_size, start, piece_size, cur)
                cur = []
                start = end
    if cur:
        plan = PiecePlan(start // piece_size, start, cur[-1][0] + cur[-1][1] - start, cur)
        if plan.all_zero:
            yield ZeroSpan(plan.index, 1, plan.offset, plan.length)
        else:
            yield plan


def hash_piece(plan: PiecePlan, buf: memoryview) -> bytes:
    """The digest of a piece whose data runs are in ``buf`` (offset 0 = the piece's start);
    its zero runs are hashed as zeroes without looking at ``buf``."""
    if plan.all_zero:
        return zero_digest(plan.length)
    h = hashlib.sha256()
    for off, n, zero in plan.runs:
        if zero:
            hash_zeroes(h, n)
        else:
            rel = off - plan.offset
            h.update(buf[rel : rel + n])
    return h.digest()


class PieceDigests:
    """The piece digests of one image of ``size`` bytes; absent pieces are all zero."""

    def __init__(
        self, size: int, piece_size: int = PIECE_SIZE, digests: dict[int, bytes] | None = None
    ) -> None:
        self.size = size
        self.piece_size = piece_size
        self.count = piece_count(size, piece_size)
        self._digests: dict[int, bytes] = dict(digests or {})

    def piece_length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    def get(self, index: int) -> bytes:
        return self._digests.get(index) or zero_digest(self.piece_length(index))

    def set(self, index: int, digest: bytes) -> None:
        if not 0 <= index < self.count:
            raise ValueError(f"piece {index} outside an image of {self.count} pieces")
        if digest == zero_digest(self.piece_length(index)):
            self._digests.pop(index, None)
        else:
            self._digests[index] = digest

    def update(self, digests: dict[int, bytes]) -> None:
        for index, digest in digests.items():
            self.set(index, digest)

    def clear(self, index: int, count: int) -> None:
        """Pieces ``index`` to ``index + count - 1`` are all zero."""
        if count <= len(self._digests):
            for i in range(index, index + count):
                self._digests.pop(i, None)
        else:
            for i in [k for k in self._digests if index <= k < index + count]:
                del self._digests[i]

    def nonzero(self) -> list[tuple[int, bytes]]:
        """(index, digest) of every piece that is not all zero, in order."""
        return sorted(self._digests.items())

    def copy(self) -> PieceDigests:
        return PieceDigests(self.size, self.piece_size, self._digests)

    def image_digest(self) -> str:
        """Lower-case hex of the image digest."""
        h = hashlib.sha256()
        full_zero = zero_digest(self.piece_size) if self.count else b""
        run = full_zero * 32768  # 1 MiB of zero-piece digests, fed in slices
        pos = 0

        def zeroes_until(stop: int) -> None:
            nonlocal pos
            while pos < stop:
                if pos == self.count - 1:  # the last piece may be shorter
                    h.update(zero_digest(self.piece_length(pos)))
                    pos += 1
                    continue
                k = min(stop, self.count - 1) - pos
                k = min(k, len(run) // DIGEST_SIZE)
                h.update(run[: k * DIGEST_SIZE])
                pos += k

        for index, digest in self.nonzero():
            zeroes_until(index)
            h.update(digest)
            pos = index + 1
        zeroes_until(self.count)
        return h.hexdigest()

    def first_difference(self, other: PieceDigests) -> int | None:
        """The index of the first piece whose digest differs from ``other``'s."""
        keys = sorted(set(self._digests) | set(other._digests))
        return next((i for i in keys if self.get(i) != other.get(i)), None)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PieceDigests)
            and self.size == other.size
            and self.piece_size == other.piece_size
            and self._digests == other._digests
        )

    def __hash__(self) -> int:  # mutable: not hashable in the usual sense
        raise TypeError("PieceDigests is mutable")
