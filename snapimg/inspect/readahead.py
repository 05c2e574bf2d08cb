"""Sequential reads with a reader thread running ahead of the consumer.

``checksum`` and ``diff`` spend their time in two things that both release the GIL: the
``pread`` (file or NBD) and hashing / comparing.  A reader thread a few chunks ahead lets
them overlap, as a plain ``read(); update()`` loop cannot.  Reads land in a small ring of
reused buffers: fresh multi-MiB ``bytes`` per read would cost a page fault per 4 KiB.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator

from snapimg.inspect.source import Source

CHUNK = 4 << 20
_DEPTH = 4
_DONE = object()


def chunked(offset: int, length: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """``[offset, offset+length)`` cut into pieces of at most ``chunk`` bytes."""
    end = offset + length
    while offset < end:
        n = min(chunk, end - offset)
        yield offset, n
        offset += n


def _read_in_line(src: Source, reads: Iterable[tuple[int, int]]) -> Iterator[bytearray]:
    buf = bytearray(CHUNK)
    for off, n in reads:
        out = buf if n == CHUNK else bytearray(n)
        src.pread_into(off, out, n)
        yield out


class _Failed:
    def __init__(self, err: BaseException) -> None:
        self.err = err


def read_ahead(
    src: Source, reads: Iterable[tuple[int, int]], depth: int = _DEPTH
) -> Generator[bytearray, None, None]:
    """The data of each (offset, length) in ``reads`` (at most CHUNK long), in order.

    Each yielded buffer is exactly as long as its read and valid until the consumer asks
    for the next one but ``depth``: it is then reused.  Closing the generator early
    (break, exception) stops the reader thread.  ``depth=0``: no thread, each read done
    when asked for (page-cache reads are CPU work: a thread only adds hand-offs).
    """
    if depth == 0:
        yield from _read_in_line(src, reads)
        return
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    ring = [bytearray(CHUNK) for _ in range(depth + 2)]

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for i, (off, n) in enumerate(reads):
                buf = ring[i % len(ring)]
                if len(buf) != n:  # a short piece: its own buffer, so ring ones keep CHUNK
                    buf = bytearray(n)
                src.pread_into(off, buf, n)
                if not put(buf):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put(_Failed(err))
            return
        put(_DONE)

    t = threading.Thread(target=work, name="snapimg-readahead", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.err
            assert isinstance(item, bytearray)
            yield item
    finally:
        stop.set()
        t.join()
