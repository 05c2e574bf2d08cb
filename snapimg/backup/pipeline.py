"""Pieces through a pipeline: read over NBD, write to a sink, hash (``sha256-pieces``).

Work is cut into 4 MiB pieces (:mod:`snapimg.digest`).  The ranges to visit are first
classified by block status: pieces the server reports as all zeroes are never read or
hashed.  For the others, one thread keeps reads of several pieces in flight over a few
connections (``aio_pread`` straight into a reused piece buffer, completions found with
select); a finished piece is hashed by a small thread pool, then written to the sink (a
qcow2 image exported by QEMU, a raw file, or nothing) by a pool of writer threads, each
with its own connection, so that several writes are in flight.  SHA-256 and libnbd
release the GIL, so pieces are hashed in parallel with each other, the reads and the
writes.  Optionally a sequencer thread also computes the SHA-256 of the whole image
(pieces in order, zero runs fed as zeroes: that one costs the virtual size).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import select
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import nbd

from snapimg.backup.nbdread import NbdReader
from snapimg.digest import (
    PIECE_SIZE,
    PiecePlan,
    ZeroSpan,
    hash_piece,
    hash_zeroes,
    split_pieces,
)
from snapimg.errors import BackupError
from snapimg.nbd.allocation import STATUS_MAX
from snapimg.progress import Progress

Range = tuple[int, int]
WORKERS = min(4, os.cpu_count() or 2)  # hashing threads
WRITERS = 8  # threads with a write connection each: writes in flight to the sink
MAX_PIECES = 24  # pieces in flight (read, queued or being hashed): 96 MiB of buffers
_ZERO_MAX = 1 << 30  # largest NBD_CMD_WRITE_ZEROES sent
# Largest NBD_CMD_WRITE sent: QEMU's NBD server allocates a fresh buffer per request,
# and buffers of 4 MiB cost it page faults that 1 MiB ones mostly do not (measured).
_WRITE_MAX = 1 << 20


class PieceJob(NamedTuple):
    plan: PiecePlan
    writes: list[Range]  # ranges inside the piece that go to the sink


class ZeroJob(NamedTuple):
    span: ZeroSpan
    writes: list[Range]  # ranges inside the span that go to the sink (as zeroes)


Job = PieceJob | ZeroJob


class Sink(Protocol):
    def write_piece(self, job: PieceJob, buf: memoryview) -> int:
        """Write ``job.writes`` (data from ``buf``, zero runs as the sink wants); returns
        the data bytes written.  Called from several threads at once."""
        ...

    def write_zeroes(self, ranges: list[Range]) -> None:
        """Make ``ranges`` read as zeroes (or nothing, for a sink that already does)."""
        ...


def _is_zero(view: memoryview) -> bool:
    return bool(nbd.Buffer.from_buffer(view).is_zero())


def write_runs(job: PieceJob, buf: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, zero) of every write of ``job``: a run the server reported as
    zeroes, or data that reads as all zero, is a zero write."""
    runs = job.plan.runs
    i = 0
    for off, n in job.writes:
        end = off + n
        while off < end:
            while runs[i][0] + runs[i][1] <= off:
                i += 1
            r_off, r_len, zero = runs[i]
            k = min(end, r_off + r_len) - off
            if not zero:
                rel = off - job.plan.offset
                zero = _is_zero(buf[rel : rel + k])
            yield off, k, zero
            off += k


class NbdSink:
    """Writes into an NBD export (one connection per worker thread).  ``zeroes``:
    ``"skip"`` for a fresh image that reads as zero, ``"write"`` for an overlay whose zero
    ranges must hide the backing file's data (NBD_CMD_WRITE_ZEROES)."""

    def __init__(self, uri: str, zeroes: Literal["skip", "write"]) -> None:
        self.uri = uri
        self.zeroes = zeroes
        self._local = threading.local()
        self._handles: list[nbd.NBD] = []
        self._lock = threading.Lock()

    def _handle(self) -> nbd.NBD:
        h: nbd.NBD | None = getattr(self._local, "h", None)
        if h is None:
            h = nbd.NBD()
            h.set_handle_name(f"snapimg-write-{len(self._handles)}")
            h.connect_uri(self.uri)
            self._local.h = h
            with self._lock:
                self._handles.append(h)
        return h

    def write_piece(self, job: PieceJob, buf: memoryview) -> int:
        written = 0
        try:
            h = self._handle()
            for off, n, zero in write_runs(job, buf):
                if zero:
                    if self.zeroes == "write":
                        h.zero(n, off)
                    continue
                rel = off - job.plan.offset
                for k in range(0, n, _WRITE_MAX):
                    h.pwrite(buf[rel + k : rel + min(n, k + _WRITE_MAX)], off + k)
                written += n
        except nbd.Error as err:
            raise BackupError(f"writing the backup file failed: {err.string}") from None
        return written

    def write_zeroes(self, ranges: list[Range]) -> None:
        if self.zeroes == "skip":
            return
        try:
            h = self._handle()
            for off, n in ranges:
                while n > 0:
                    k = min(n, _ZERO_MAX)
                    h.zero(k, off)
                    off, n = off + k, n - k
        except nbd.Error as err:
            raise BackupError(f"writing the backup file failed: {err.string}") from None

    def flush(self) -> None:
        """Flush every connection (each NBD flush covers what that connection wrote)."""
        for h in self._handles:
            h.flush()

    def close(self) -> None:
        for h in self._handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        self._handles = []


class FileSink:
    """Writes data into a fresh sparse file; zero runs stay holes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_zeroes(self, ranges: list[Range]) -> None:
        return None  # a fresh sparse file reads as zeroes

    def write_piece(self, job: PieceJob, buf: memoryview) -> int:
        written = 0
        for off, n, zero in write_runs(job, buf):
            if zero:
                continue
            rel = off - job.plan.offset
            view = buf[rel : rel + n]
            try:
                while view:
                    k = os.pwrite(self.fd, view, off)
                    view, off = view[k:], off + k
            except OSError as err:
                raise BackupError(f"writing the image failed: {err.strerror}") from None
            written += n
        return written


def plan_jobs(
    reader: NbdReader,
    regions: Iterable[Range],
    writes: list[Range] | None = None,
    piece_size: int = PIECE_SIZE,
) -> Iterator[Job]:
    """The pieces of ``regions`` (sorted, disjoint, on piece boundaries) with their runs,
    each with the part of ``writes`` (sorted, disjoint; None: everything) inside it."""
    wi = 0

    def inside(lo: int, hi: int) -> list[Range]:
        nonlocal wi
        if writes is None:
            return [(lo, hi - lo)]
        while wi < len(writes) and writes[wi][0] + writes[wi][1] <= lo:
            wi += 1
        mine: list[Range] = []
        j = wi
        while j < len(writes) and writes[j][0] < hi:
            a, b = max(writes[j][0], lo), min(writes[j][0] + writes[j][1], hi)
            mine.append((a, b - a))
            j += 1
        return mine

    step = STATUS_MAX - STATUS_MAX % piece_size
    for offset, length in regions:
        end = offset + length
        pos = offset
        while pos < end:
            n = min(step, end - pos)
            for item in split_pieces(reader.runs(pos, n), piece_size):
                lo = item.offset
                if isinstance(item, ZeroSpan):
                    yield ZeroJob(item, inside(lo, lo + item.length))
                else:
                    yield PieceJob(item, inside(lo, lo + item.length))
            pos += n


@dataclass
class PipelineResult:
    digests: dict[int, bytes] = field(default_factory=dict)  # every piece read and hashed
    zero_spans: list[tuple[int, int]] = field(default_factory=list)  # (index, count)
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_skipped: int = 0  # reported as zeroes by block status: never read
    sha256: str | None = None  # of the whole image, when asked for


class _Sequencer:
    """SHA-256 of the whole image: pieces fed in order, the rest as zeroes."""

    def __init__(self, size: int, release: queue.SimpleQueue[bytearray]) -> None:
        self.size = size
        self.release = release
        self.sha = hashlib.sha256()
        self.pos = 0
        self._ready: dict[int, tuple[PieceJob, bytearray | None]] = {}
        self._order: queue.SimpleQueue[int] = queue.SimpleQueue()  # piece offsets, in order
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="snapimg-sha256", daemon=True)
        self._thread.start()

    def expect(self, job: PieceJob) -> None:
        self._order.put(job.plan.offset)

    def put(self, job: PieceJob, buf: bytearray | None) -> None:
        with self._cond:
            self._ready[job.plan.offset] = (job, buf)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while (offset := self._order.get()) >= 0:
                with self._cond:
                    while offset not in self._ready:
                        self._cond.wait()
                    job, buf = self._ready.pop(offset)
                hash_zeroes(self.sha, offset - self.pos)
                for off, n, zero in job.plan.runs:
                    if zero or buf is None:
                        hash_zeroes(self.sha, n)
                    else:
                        rel = off - offset
                        self.sha.update(memoryview(buf)[rel : rel + n])
                self.pos = offset + job.plan.length
                if buf is not None:
                    self.release.put(buf)
            hash_zeroes(self.sha, self.size - self.pos)
        except BaseException as err:  # reported by finish()
            self._error = err

    def finish(self) -> str:
        self._order.put(-1)
        while self._thread.is_alive():
            self._thread.join(0.2)
        if self._error is not None:
            raise self._error
        return self.sha.hexdigest()


class _Planner:
    """``jobs`` produced by a thread running ahead: planning asks the server for block
    status, and its round trips then overlap the data transfers."""

    END = object()

    def __init__(self, jobs: Iterable[Job], depth: int = 256) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(jobs,), name="snapimg-plan", daemon=True
        )
        self._thread.start()

    def _produce(self, jobs: Iterable[Job]) -> None:
        try:
            for job in jobs:
                if not self._put(job):
                    return
            self._put(self.END)
        except BaseException as err:  # raised in the consumer
            self._put(err)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def get(self, timeout: float) -> object | None:
        """The next job, END, or None if none came within ``timeout`` (0: do not wait)."""
        try:
            item = self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()


def run_pipeline(
    reader: NbdReader,
    jobs: Iterable[Job],
    sink: Sink | None = None,
    *,
    whole_sha256: bool = False,
    progress: Progress | None = None,
    workers: int = WORKERS,
    max_pieces: int = MAX_PIECES,
) -> PipelineResult:
    """Read, write and hash every piece of ``jobs``; the digest of each piece read."""
    return _Pipeline(reader, sink, workers, max_pieces, whole_sha256, progress).run(jobs)


_Done = tuple[Job, bytes | None, int]  # job, digest (None: a zero span), bytes written


def _chain(fut: Future[bytes], then: Callable[[bytes], _Done]) -> Future[_Done]:
    """A finished future of ``then(fut.result())``, or of ``fut``'s exception."""
    out: Future[_Done] = Future()
    err = fut.exception()
    if err is not None:
        out.set_exception(err)
    else:
        out.set_result(then(fut.result()))
    return out


class _Pipeline:
    def __init__(
        self,
        reader: NbdReader,
        sink: Sink | None,
        workers: int,
        max_pieces: int,
        whole_sha256: bool,
        progress: Progress | None,
    ) -> None:
        self.reader = reader
        self.sink = sink
        self.max_pieces = max_pieces
        self.progress = progress
        self.result = PipelineResult()
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.buffers = 0
        self.active = 0  # jobs started and not yet finished by a worker
        self.done: queue.SimpleQueue[Future[_Done]] = queue.SimpleQueue()
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="snapimg-hash")
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="snapimg-write")
        self.seq = _Sequencer(reader.size, self.free) if whole_sha256 else None
        self.max_request = min(reader.max_request, PIECE_SIZE)
        # per connection: cookie -> (piece offset, libnbd buffer)
        self.inflight: list[dict[int, tuple[int, nbd.Buffer]]] = [{} for _ in reader.handles]
        self.reading: dict[int, tuple[PieceJob, bytearray, list[int]]] = {}  # reads left

    def run(self, jobs: Iterable[Job]) -> PipelineResult:
        planner = _Planner(jobs)
        try:
            self._loop(planner)
            if self.seq is not None:
                self.result.sha256 = self.seq.finish()
        except nbd.Error as err:
            raise BackupError(f"reading {self.reader.uri} failed: {err.string}") from None
        finally:
            planner.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.writers.shutdown(wait=False, cancel_futures=True)
        return self.result

    def _loop(self, planner: _Planner) -> None:
        pending: Job | None = None
        exhausted = False
        while True:
            while not exhausted and self.active < self.max_pieces:
                if pending is None:
                    busy = self.active or any(self.inflight)
                    item = planner.get(0 if busy else 0.2)
                    if item is None:
                        break  # the planner is behind: do other work meanwhile
                    if item is _Planner.END:
                        exhausted = True
                        break
                    assert isinstance(item, PieceJob | ZeroJob)
                    pending = item
                if not self._start(pending):
                    break  # no free buffer: wait for a worker or the sequencer
                pending = None
            self._collect()
            if exhausted and self.active == 0:
                return
            if any(self.inflight):
                self._wait_reads()
            elif self.active or pending is not None:
                self._wait_worker()

    def _buffer(self) -> bytearray | None:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            if self.buffers < self.max_pieces:
                self.buffers += 1
                return bytearray(PIECE_SIZE)
            return None

    def _start(self, job: Job) -> bool:
        """Start a job; False when no buffer is free (try again later)."""
        if isinstance(job, ZeroJob):
            self.result.bytes_skipped += job.span.length
            self.result.zero_spans.append((job.span.index, job.span.count))
            if self.sink is not None and job.writes:
                self.active += 1
                self._submit(job, None)
            elif self.progress is not None:
                self.progress.add(job.span.length)
            return True
        buf = self._buffer()
        if buf is None:
            return False
        if self.seq is not None:
            self.seq.expect(job)
        self.active += 1
        left = [0]
        self.reading[job.plan.offset] = (job, buf, left)
        for off, n, zero in job.plan.runs:
            if zero:
                self.result.bytes_skipped += n
                continue
            done = 0
            while done < n:
                k = min(self.max_request, n - done)
                rel = off + done - job.plan.offset
                nbuf = nbd.Buffer.from_buffer(memoryview(buf)[rel : rel + k])
                i = min(range(len(self.inflight)), key=lambda c: len(self.inflight[c]))
                cookie = self.reader.handles[i].aio_pread(nbuf, off + done)
                self.inflight[i][cookie] = (job.plan.offset, nbuf)
                left[0] += 1
                done += k
        if left[0] == 0:  # a piece of zero runs only (not a whole-piece span)
            del self.reading[job.plan.offset]
            self._submit(job, buf)
        return True

    def _submit(self, job: Job, buf: bytearray | None) -> None:
        """Hash (a hashing thread), then write (a writing thread: sync writes, several in
        flight over their own connections), then report to the main thread."""
        if isinstance(job, ZeroJob):
            self.writers.submit(self._write_zeroes, job).add_done_callback(self.done.put)
            return
        assert buf is not None

        def hashed(fut: Future[bytes]) -> None:
            if fut.cancelled():  # the pipeline is being torn down
                self._release(job, buf)
                return
            if fut.exception() is not None or not (self.sink and job.writes):
                self._release(job, buf)
                self.done.put(_chain(fut, lambda digest: (job, digest, 0)))
                return
            try:
                self.writers.submit(self._write, job, buf, fut.result()).add_done_callback(
                    self.done.put
                )
            except RuntimeError:  # shut down meanwhile (an error or a signal elsewhere)
                self._release(job, buf)

        self.pool.submit(hash_piece, job.plan, memoryview(buf)).add_done_callback(hashed)

    def _write_zeroes(self, job: ZeroJob) -> _Done:
        assert self.sink is not None
        self.sink.write_zeroes(job.writes)
        return job, None, 0

    def _write(self, job: PieceJob, buf: bytearray, digest: bytes) -> _Done:
        assert self.sink is not None
        try:
            written = self.sink.write_piece(job, memoryview(buf))
        finally:
            self._release(job, buf)
        return job, digest, written

    def _release(self, job: PieceJob, buf: bytearray) -> None:
        if self.seq is not None:
            self.seq.put(job, buf)
        else:
            self.free.put(buf)

    def _collect(self) -> None:
        while True:
            try:
                fut = self.done.get_nowait()
            except queue.Empty:
                return
            job, digest, written = fut.result()  # raises what the worker raised
            self.active -= 1
            self.result.bytes_written += written
            if isinstance(job, PieceJob):
                assert digest is not None
                self.result.digests[job.plan.index] = digest
                length = job.plan.length
            else:
                length = job.span.length
            if self.progress is not None:
                self.progress.add(length)

    def _wait_worker(self) -> None:
        """Wait a moment for a worker to finish a job, or (none active) for the
        sequencer to give a buffer back."""
        with contextlib.suppress(queue.Empty):
            if self.active:
                self.done.put(self.done.get(timeout=0.2))  # collected by _collect
            else:
                self.free.put(self.free.get(timeout=0.2))

    def _wait_reads(self) -> None:
        handles = self.reader.handles
        readers: list[int] = []
        writers: list[int] = []
        for h, flight in zip(handles, self.inflight, strict=True):
            if not flight:
                continue
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                readers.append(h.aio_get_fd())
            if d & nbd.AIO_DIRECTION_WRITE:
                writers.append(h.aio_get_fd())
        can_read, can_write, _ = select.select(readers, writers, [], 0.2)
        for h, flight in zip(handles, self.inflight, strict=True):
            if not flight:
                continue
            fd = h.aio_get_fd()
            if fd in can_read:
                h.aio_notify_read()
            if fd in can_write:
                h.aio_notify_write()
            while flight:
                cookie = h.aio_peek_command_completed()
                if cookie <= 0:
                    break
                key, nbuf = flight.pop(cookie)
                try:
                    h.aio_command_completed(cookie)
                except nbd.Error as err:
                    raise BackupError(f"reading {self.reader.uri} failed: {err.string}") from None
                self.result.bytes_read += len(nbuf)
                job, buf, left = self.reading[key]
                left[0] -= 1
                if left[0] == 0:
                    del self.reading[key]
                    self._submit(job, buf)
