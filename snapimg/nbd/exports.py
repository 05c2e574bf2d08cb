"""The table of NBD exports a server offers: export name -> block device.

The data plane adds an export per origin and per snapshot and removes a snapshot's
export when it is dropped; listeners (the server) then cut the connections still
using it.  Only touched from the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapimg.blockdev import BlockDevice


@dataclass(frozen=True)
class Export:
    name: str
    device: BlockDevice
    description: str = ""


class ExportTable:
    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self._removal_listeners: list[Callable[[str], None]] = []

    def add(self, name: str, device: BlockDevice, description: str = "") -> Export:
        if name in self._exports:
            raise ValueError(f"export {name!r} exists")
        export = Export(name, device, description)
        self._exports[name] = export
        return export

    def remove(self, name: str) -> None:
        if self._exports.pop(name, None) is not None:
            for listener in self._removal_listeners:
                listener(name)

    def on_removal(self, listener: Callable[[str], None]) -> None:
        self._removal_listeners.append(listener)

    def get(self, name: str) -> Export | None:
        """The export called ``name``; the empty name is the first export added."""
        if name == "":
            return next(iter(self._exports.values()), None)
        return self._exports.get(name)

    def names(self) -> list[str]:
        return list(self._exports)

    def __contains__(self, name: object) -> bool:
        return name in self._exports
