"""Checking backups: while copying (read-back) and afterwards (sha256 of a chain).

While a backup copies, :class:`ReadBackVerifier` runs in its own thread and receives the
image pieces in offset order: every chunk written to the backup file is read back from the
file and compared byte for byte with what the snapshot served; with ``hash_stream`` the
sha256 of the full image is computed over the read-back bytes (zero pieces, which the
snapshot reported as zeroes and the backup file holds as holes, are hashed as zeroes).
So the sha256 in the manifest is the sha256 of what was written, and it equals the
sha256 of what the snapshot serves.  :func:`verify_backup` re-checks a backup in DIR
later by rebuilding its image virtually (no temporary copy) and hashing it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from snapimg.backup import chain
from snapimg.backup.fileio import hash_zeroes
from snapimg.backup.manifest import Manifest
from snapimg.errors import BackupError
from snapimg.progress import Progress

_STOP = object()


class ReadBackVerifier:
    """Background thread: read back, compare and (optionally) hash, in image order."""

    def __init__(self, fd: int, *, hash_stream: bool, max_chunk: int, depth: int,
                 progress: Progress | None = None) -> None:
        self.fd = fd
        self.progress = progress  # advanced by this thread only
        self.hash_stream = hash_stream
        self._sha = hashlib.sha256()
        self._pos: int | None = None
        self._back = bytearray(max_chunk)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.verified_bytes = 0
        self._thread = threading.Thread(target=self._run, name="backup-verify", daemon=True)
        self._thread.start()

    def put_data(self, offset: int, buf: bytearray, length: int, written: bool,
                 release: Callable[[], None]) -> None:
        """``buf[:length]``: what the snapshot served at ``offset``; ``written``: it went to
        the file (else it was all zeroes).  ``release()`` is called once ``buf`` is done."""
        self._check()
        self._queue.put((offset, length, written, buf, release))

    def put_zero(self, offset: int, length: int) -> None:
        """A run the snapshot reported as zeroes (not read, not written)."""
        self._check()
        self._queue.put((offset, length, False, None, None))

    def finish(self) -> str | None:
        """Wait for the thread; raise on a mismatch; the stream sha256 if hashing."""
        self._queue.put(_STOP)
        self._thread.join()
        self._check()
        return self._sha.hexdigest() if self.hash_stream else None

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere (pending pieces are dropped)."""
        if self._thread.is_alive():
            self._error = self._error or BackupError("aborted")
            self._queue.put(_STOP)
            self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, tuple)
            offset, length, written, buf, release = item
            try:
                if self._error is None:
                    self._one(offset, length, written, buf)
            except BaseException as err:  # reported by the next put/finish
                self._error = err
            finally:
                if release is not None:
                    release()

    def _one(self, offset: int, length: int, written: bool, buf: bytearray | None) -> None:
        if self.hash_stream and self._pos is not None and offset != self._pos:
            raise BackupError(f"internal: verifier got offset {offset}, expected {self._pos}")
        self._pos = offset + length
        self._check_piece(offset, length, written, buf)
        if self.progress is not None:
            self.progress.add(length)

    def _check_piece(self, offset: int, length: int, written: bool,
                     buf: bytearray | None) -> None:
        if buf is None or not written:
            if self.hash_stream:
                hash_zeroes(self._sha, length)
            return
        back = memoryview(self._back)[:length]
        if os.preadv(self.fd, [back], offset) != length:
            raise BackupError(f"verification failed: short read-back at offset {offset}")
        if not buf.startswith(back):
            raise BackupError(f"verification failed: the backup file differs from the "
                              f"snapshot at offset {offset} (+{length})")
        self.verified_bytes += length
        if self.hash_stream:
            self._sha.update(back)


def verify_backup(directory: Path, manifest: Manifest, backup_id: str) -> str:
    """Rebuild the image of ``backup_id`` virtually, hash it, compare with the manifest."""
    records = chain.resolve(directory, manifest, backup_id)
    segments = chain.image_map(directory, records)
    digest = chain.hash_segments(segments)
    want = records[-1].sha256
    if digest != want:
        raise BackupError(f"backup {backup_id}: sha256 {digest} does not match the "
                          f"manifest's {want}")
    return digest
