"""A reclaim cutting the store's data file never cuts off a copy C installs meanwhile.

Found by the fuzz target ``lifecycle-compiled`` (docs/fuzzing.md): a read-only snapshot
read back other data than its creation content.  After freeing slots, the reclaim cut
the data file at the allocator's end (``FileStore._shrunk``), reading the end in Python
and truncating afterwards; C installs first copies with slots from the same allocator
without any Python lock, so a copy whose slots were allocated past the end that Python
had read, and written before the truncation, was cut off: the snapshot then read zeroes
there, also after a reopen.  The cut is now C's (``Core.shrink_data``), with the
allocator locked.  Here the old interleaving is forced: a C install runs to its end at
the moment the reclaim reads the allocator's end from Python.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from snapimg.engine import Engine, compiled
from snapimg.engine.cstore import SharedFileStore

BS = 65536

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason="the C extension snapimg._datapath is not built"
)


class _EndRead:
    """The store's allocator, for Python: reading ``end`` runs ``during`` first."""

    def __init__(self, slots: object, during: Callable[[], None]) -> None:
        self.slots = slots
        self._during = during
        self.reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.slots, name)

    @property
    def end(self) -> int:
        end = int(getattr(self.slots, "end"))  # noqa: B009
        self.reads += 1
        self._during()  # after the end was read
        return end


def test_reclaim_keeps_a_copy_installed_while_it_cuts(tmp_path: Path) -> None:
    paths = {}
    for name, blocks in (("a", 1), ("b", 4)):
        paths[name] = tmp_path / f"{name}.img"
        paths[name].write_bytes(os.urandom(blocks * BS))
    eng = Engine.open(tmp_path / "store", paths, BS, datapath="compiled")
    try:
        store, core = eng.store, getattr(eng.dp, "core")  # noqa: B009
        assert isinstance(store, SharedFileStore) and store.shared
        a, b = eng.origin_device("a"), eng.origin_device("b")
        eng.create_snapshot("a", "x")
        a.pwrite(0, b"x" * 512)  # its copy takes slot 0, the allocator's end
        content = b.pread(0, 4 * BS)
        eng.create_snapshot("b", "y")
        installs = core.stats()["fast_installs"]
        go = threading.Event()
        writer = threading.Thread(target=lambda: (go.wait(), b.pwrite(0, os.urandom(4 * BS))))
        writer.start()

        def install_now() -> None:  # C allocates past the end read, copies, records
            go.set()
            while core.stats()["fast_installs"] == installs and writer.is_alive():
                time.sleep(0.001)

        spy = _EndRead(store.slots, install_now)
        store.slots = spy  # type: ignore[assignment]
        try:
            eng.drop_snapshot("a", "x")  # frees slot 0: the area shrinks, the file is cut
        finally:
            store.slots = spy.slots  # type: ignore[assignment]
            go.set()
        writer.join()
        assert core.stats()["fast_installs"] == installs + 1  # C installed y's copies
        assert eng.snapshot_device("b", "y").pread(0, 4 * BS) == content
    finally:
        eng.close()
    with Engine.open(tmp_path / "store", paths, BS, datapath="compiled") as again:
        assert again.snapshot_device("b", "y").pread(0, 4 * BS) == content
