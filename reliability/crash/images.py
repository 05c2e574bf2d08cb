"""Sparse file contents for crash states: a size and 4 KiB pages (absent pages are zero)."""

from __future__ import annotations

import hashlib
import os

PAGE = 4096
SECTOR = 512
_ZERO_PAGE = bytes(PAGE)


class Image:
    __slots__ = ("size", "pages", "_digest")

    def __init__(self, size: int = 0, pages: dict[int, bytes] | None = None) -> None:
        self.size = size
        self.pages: dict[int, bytes] = pages if pages is not None else {}
        self._digest: bytes | None = None

    @classmethod
    def of(cls, data: bytes) -> Image:
        img = cls()
        img.write(0, data)
        return img

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Image:
        with open(path, "rb") as f:
            return cls.of(f.read())

    def copy(self) -> Image:
        return Image(self.size, dict(self.pages))

    def read(self, off: int, n: int) -> bytes:
        """Bytes [off, off+n), zero beyond the end (not clipped to the size)."""
        out = bytearray()
        pos, end = off, off + n
        while pos < end:
            pno, within = divmod(pos, PAGE)
            take = min(PAGE - within, end - pos)
            page = self.pages.get(pno, _ZERO_PAGE)
            out += page[within : within + take]
            pos += take
        return bytes(out)

    def content(self) -> bytes:
        return self.read(0, self.size)

    def _put(self, off: int, data: bytes | memoryview) -> None:
        self._digest = None
        view = memoryview(data)
        pos = off
        while view:
            pno, within = divmod(pos, PAGE)
            take = min(PAGE - within, len(view))
            if within == 0 and take == PAGE:
                page = bytes(view[:PAGE])
            else:
                buf = bytearray(self.pages.get(pno, _ZERO_PAGE))
                buf[within : within + take] = view[:take]
                page = bytes(buf)
            if page == _ZERO_PAGE:
                self.pages.pop(pno, None)
            else:
                self.pages[pno] = page
            view = view[take:]
            pos += take

    def write(self, off: int, data: bytes | memoryview) -> None:
        """A write: data lands, the size grows to cover it."""
        self._put(off, data)
        self.size = max(self.size, off + len(data))

    def place(self, off: int, data: bytes | memoryview, end: int) -> None:
        """Post-write sector images: ``data`` at ``off``; the size grows to ``end``."""
        self.size = max(self.size, end)
        data = memoryview(data)[: max(0, self.size - off)]
        self._put(off, data)

    def zero(self, off: int, n: int) -> None:
        end = min(off + n, self.size)
        first, last = -(-off // PAGE), end // PAGE  # whole pages [first, last)
        if last - first > len(self.pages):
            self._digest = None
            for pno in [p for p in self.pages if first <= p < last]:
                del self.pages[pno]
            if first * PAGE > off:
                self._put(off, bytes(min(end, first * PAGE) - off))
            if last >= first and end > last * PAGE:
                self._put(last * PAGE, bytes(end - last * PAGE))
            return
        pos = off
        while pos < end:
            pno, within = divmod(pos, PAGE)
            take = min(PAGE - within, end - pos)
            if within == 0 and take == PAGE:
                self._digest = None
                self.pages.pop(pno, None)
            else:
                self._put(pos, bytes(take))
            pos += take

    def truncate(self, size: int) -> None:
        if size < self.size:
            for pno in [p for p in self.pages if p * PAGE >= size]:
                del self.pages[pno]
            if size % PAGE and size // PAGE in self.pages:
                self._put(size, bytes(PAGE - size % PAGE))
        self._digest = None
        self.size = size

    def digest(self) -> bytes:
        if self._digest is None:
            h = hashlib.blake2b(str(self.size).encode(), digest_size=16)
            for pno in sorted(self.pages):
                h.update(pno.to_bytes(8, "little"))
                h.update(self.pages[pno])
            self._digest = h.digest()
        return self._digest

    def store(self, fd: int) -> None:
        """Write this content into the open file ``fd`` (sparse: zero pages skipped)."""
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.size)
        for pno, page in self.pages.items():
            pos = pno * PAGE
            if pos < self.size:
                os.pwrite(fd, page[: self.size - pos], pos)
