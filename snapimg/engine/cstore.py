"""The store directory as the compiled data path shares it with C.

C installs the common first copy itself (csrc/datapath/device.c: slots, copy, COPY
record, table entries) without the GIL, so the store's record log and its slot
allocator live in C (``Core.append``, ``_datapath.Slots``) and Python uses the same
ones: :class:`SharedFileStore` is a :class:`~snapimg.engine.store.FileStore` whose log
end, log reserve, append count, data-area reserve and allocator are C's.  With an
injected ``fault`` hook it is the plain Python store (store I/O must pass the hook).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapimg.engine.store import Fault, FileStore

if TYPE_CHECKING:
    from snapimg._datapath import Core, Slots


def _shared(name: str, field: str) -> property:
    """An attribute kept in C (``core.<field>``) unless the store is Python's only."""

    def get(self: SharedFileStore) -> Any:
        return getattr(self.core, field) if self.shared else self.__dict__.get(name, 0)

    def put(self: SharedFileStore, value: Any) -> None:
        if self.shared:
            setattr(self.core, field, value)
        else:
            self.__dict__[name] = value

    return property(get, put)


def _file(name: str) -> property:
    """A file descriptor C uses too (``Core.set_store``): told to C when it changes."""

    def get(self: SharedFileStore) -> int:
        return int(self.__dict__.get(name, -1))

    def put(self: SharedFileStore, fd: int) -> None:
        self.__dict__[name] = fd
        if self.shared:
            self.core.set_store(self.data_fd, self.meta_fd)

    return property(get, put)


class SharedFileStore(FileStore):
    log_end = _shared("log_end", "log_end")
    _reserved = _shared("_reserved", "log_reserved")
    appended = _shared("appended", "appended")
    _data_reserved = _shared("_data_reserved", "data_reserved")
    data_fd = _file("data_fd")
    meta_fd = _file("meta_fd")

    def __init__(
        self, path: Path, block_size: int, strict: bool, boot_id: str, fault: Fault | None,
        *, core: Core,
    ) -> None:  # fmt: skip
        self.core = core
        self.shared = fault is None
        self._c_slots: Slots | None = None
        super().__init__(path, block_size, strict, boot_id, fault)
        if self.shared:
            from snapimg import _datapath

            self._c_slots = _datapath.Slots()
            self.slots = self._c_slots  # type: ignore[assignment]  # the same methods
            core.set_slots(self._c_slots, self.reserve_data)

    @property
    def reserve_data(self) -> bool:
        return bool(self.__dict__.get("_prealloc", True))

    @reserve_data.setter
    def reserve_data(self, on: bool) -> None:
        self.__dict__["_prealloc"] = on
        if self._c_slots is not None:
            self.core.set_slots(self._c_slots, on)

    def append(self, blob: bytes) -> int:
        if not self.shared:
            return super().append(blob)
        if self.strict:  # as FileStore._append: slot data durable before its record
            self._sync_data()
        return self.core.append(blob)

    def _reserve_log(self) -> None:
        if not self.shared:
            super()._reserve_log()
        else:
            self.core.reserve_log()

    def _grown(self) -> None:
        if not self.shared:
            super()._grown()
        else:
            self.core.grow_data()
