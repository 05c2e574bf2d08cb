"""Digests of a whole image: ``sha256sum`` of its raw bytes, or ``sha256-pieces``.

Holes and extents known to read as zeroes are hashed from a zero buffer without being
read; data extents are read ahead by a helper thread while the main thread hashes.  The
pieces digest (the one backups record, docs/backup.md) does not even hash zero pieces.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from snapimg.digest import PIECE_SIZE, PieceDigests, PiecePlan, hash_piece, split_pieces
from snapimg.errors import UsageError
from snapimg.inspect.readahead import CHUNK, chunked, read_ahead
from snapimg.inspect.source import Source

_ZEROES = memoryview(bytes(CHUNK))


def check_algo(algo: str) -> None:
    if algo not in hashlib.algorithms_available or algo.startswith("shake_"):
        choices = ", ".join(sorted(a for a in hashlib.algorithms_guaranteed if "shake" not in a))
        raise UsageError(f"unknown digest {algo!r}: choose one of {choices}")


def _plan(src: Source) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, read?) pieces of at most CHUNK bytes over the whole source."""
    for off, ext in src.extents():
        for o, n in chunked(off, ext.length):
            yield o, n, not (ext.hole or ext.zero)


def checksum(
    src: Source, algo: str = "sha256", progress: Callable[[int], None] | None = None
) -> str:
    """Hex digest of all ``src.size`` bytes; ``progress(done_bytes)`` after each piece."""
    check_algo(algo)
    h = hashlib.new(algo)
    plan = list(_plan(src))
    data = read_ahead(src, ((o, n) for o, n, read in plan if read))
    done = 0
    try:
        for _, n, read in plan:
            h.update(next(data) if read else _ZEROES[:n])
            done += n
            if progress is not None:
                progress(done)
    finally:
        data.close()
    return h.hexdigest()


def pieces_digest(
    src: Source, progress: Callable[[int], None] | None = None, workers: int = 2
) -> str:
    """The ``sha256-pieces`` image digest (:mod:`snapimg.digest`) of ``src``.

    Pieces the allocation map reports as zeroes are neither read nor hashed; the others
    are read here and hashed by ``workers`` threads (SHA-256 releases the GIL).
    """
    digests = PieceDigests(src.size)
    runs = ((off, ext.length, ext.zero) for off, ext in src.extents())
    free = [bytearray(PIECE_SIZE) for _ in range(workers + 2)]
    pending: deque[tuple[Future[bytes], int, bytearray]] = deque()
    done = 0

    def finish_one() -> None:
        nonlocal done
        fut, index, buf = pending.popleft()
        digests.set(index, fut.result())
        free.append(buf)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="snapimg-checksum") as pool:
        for item in split_pieces(runs):
            if isinstance(item, PiecePlan):
                if not free:
                    finish_one()
                buf = free.pop()
                view = memoryview(buf)
                for off, n, zero in item.runs:
                    if not zero:
                        rel = off - item.offset
                        src.pread_into(off, view[rel : rel + n], n)
                pending.append((pool.submit(hash_piece, item, view), item.index, buf))
            done += item.length
            if progress is not None:
                progress(done)
        while pending:
            finish_one()
    return digests.image_digest()
