"""Sequential reads with a reader thread running ahead of the consumer.

``checksum`` and ``diff`` spend their time in two things that both release the GIL: the
``pread`` (file or NBD) and hashing / comparing.  A reader thread a few chunks ahead lets
them overlap, as a plain ``read(); update()`` loop cannot.
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


class _Failed:
    def __init__(self, err: BaseException) -> None:
        self.err = err


def read_ahead(
    src: Source, reads: Iterable[tuple[int, int]], depth: int = _DEPTH
) -> Generator[bytes, None, None]:
    """The data of each (offset, length) in ``reads``, in order, read by a helper thread.

    Closing the iterator early (break, exception) stops the thread.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

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
            for off, n in reads:
                if not put(src.pread(off, n)):
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
            assert isinstance(item, bytes)
            yield item
    finally:
        stop.set()
        t.join()
