"""The block device interface between the engine and the data planes.

An NBD export (or any other front end) serves an object satisfying
:class:`BlockDevice`.  The engine's origin and snapshot devices implement it; the
protocol code knows nothing else about the engine.  Methods are synchronous and
thread-safe: the NBD server calls them from worker threads.  Refusals raise
:class:`snapimg.errors.DeviceError` subclasses, whose ``errno`` the server reports.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable


class Extent(NamedTuple):
    """A run of ``length`` bytes with uniform allocation state.

    ``hole``: not allocated (reads as zeroes unless ``zero`` is False, which never
    happens for a raw file).  ``zero``: known to read as zeroes.  These map onto
    NBD_STATE_HOLE and NBD_STATE_ZERO of the ``base:allocation`` context.
    """

    length: int
    hole: bool
    zero: bool


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def can_trim(self) -> bool:
        """True when :meth:`trim` does something (origin punch hole, snapshot release)."""
        ...

    @property
    def can_multi_conn(self) -> bool:
        """True when flush on one connection covers writes made on every connection."""
        ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = False
    ) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least the first byte of [offset, offset+length).

        They may end short of ``offset+length`` but never run past it.
        """
        ...
