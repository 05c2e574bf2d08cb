"""Model-based test: random interleavings of engine operations against a trivial
in-memory reference (a bytearray per origin and per snapshot).

The reference keeps a full copy of every snapshot and the set of blocks each one has
had preserved; the engine must read the same bytes, count the same preserved blocks,
report changed ranges covering every difference, free every slot nobody needs, and
come back identical after a clean close or an abandoned (killed) session.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from snapimg.engine import Engine
from snapimg.errors import ReleasedRangeError

BS = 4096
SIZE = 12 * BS + 700  # the last block is partial
NBLOCKS = (SIZE + BS - 1) // BS


def blocks_of(offset: int, length: int) -> set[int]:
    return set(range(offset // BS, (offset + length - 1) // BS + 1)) if length else set()


@dataclass
class ModelSnap:
    data: bytearray
    writable: bool
    preserved: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)


class EngineModel(RuleBasedStateMachine):
    snaps = Bundle("snaps")
    datapath = "python"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="snapimg-model-"))
        self.path = self.dir / "disk.img"
        self.origin = bytearray(SIZE)
        self.model: dict[str, ModelSnap] = {}
        self.counter = 0
        self.eng: Engine | None = None

    @initialize(ram=st.booleans(), seed=st.integers(0, 1 << 32))
    def start(self, ram: bool, seed: int) -> None:
        self.ram = ram
        self.origin[:] = random.Random(seed).randbytes(SIZE)
        self.path.write_bytes(self.origin)
        self.eng = self._open()

    def _open(self) -> Engine:
        store = None if self.ram else self.dir / "store"
        return Engine.open(store, {"d": self.path}, block_size=BS, datapath=self.datapath)

    @property
    def e(self) -> Engine:
        assert self.eng is not None
        return self.eng

    def teardown(self) -> None:
        if self.eng is not None:
            self.eng.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- operations --------------------------------------------------------------------

    @rule(
        offset=st.integers(0, SIZE - 1),
        length=st.integers(0, 3 * BS),
        byte=st.integers(0, 255),
        fua=st.booleans(),
    )
    def origin_write(self, offset: int, length: int, byte: int, fua: bool) -> None:
        length = min(length, SIZE - offset)
        self.e.origin_device("d").pwrite(offset, bytes([byte]) * length, fua=fua)
        touched = blocks_of(offset, length)
        for m in self.model.values():
            m.preserved |= touched - m.released
        self.origin[offset : offset + length] = bytes([byte]) * length

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(0, 2 * BS), punch=st.booleans())
    def origin_zero(self, offset: int, length: int, punch: bool) -> None:
        length = min(length, SIZE - offset)
        self.e.origin_device("d").write_zeroes(offset, length, may_trim=punch)
        touched = blocks_of(offset, length)
        for m in self.model.values():
            m.preserved |= touched - m.released
        self.origin[offset : offset + length] = bytes(length)

    @rule(target=snaps, writable=st.booleans())
    def create(self, writable: bool) -> str:
        self.counter += 1
        name = f"s{self.counter}"
        info = self.e.create_snapshot("d", name, writable=writable)
        assert info.valid and info.preserved_blocks == 0 and info.writable == writable
        self.model[name] = ModelSnap(bytearray(self.origin), writable)
        return name

    @rule(name=consumes(snaps))
    def drop(self, name: str) -> None:
        self.e.drop_snapshot("d", name)
        del self.model[name]

    @rule(name=snaps, offset=st.integers(0, SIZE - 1), length=st.integers(0, 3 * BS))
    def read(self, name: str, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        m = self.model[name]
        dev = self.e.snapshot_device("d", name)
        if blocks_of(offset, length) & m.released:
            with pytest.raises(ReleasedRangeError):
                dev.pread(offset, length)
        else:
            assert dev.pread(offset, length) == m.data[offset : offset + length]

    @rule(
        name=snaps,
        offset=st.integers(0, SIZE - 1),
        length=st.integers(1, 2 * BS),
        byte=st.integers(0, 255),
    )
    def snap_write(self, name: str, offset: int, length: int, byte: int) -> None:
        m = self.model[name]
        length = min(length, SIZE - offset)
        if not m.writable or blocks_of(offset, length) & m.released:
            return
        self.e.snapshot_device("d", name).pwrite(offset, bytes([byte]) * length)
        m.data[offset : offset + length] = bytes([byte]) * length
        m.preserved |= blocks_of(offset, length)

    @rule(name=snaps, first=st.integers(0, NBLOCKS - 1), count=st.integers(1, 4))
    def release(self, name: str, first: int, count: int) -> None:
        m = self.model[name]
        end = min(SIZE, (first + count) * BS)
        self.e.snapshot_device("d", name).trim(first * BS, end - first * BS)
        gone = set(range(first, min(NBLOCKS, first + count)))
        m.released |= gone
        m.preserved -= gone

    @precondition(lambda self: not self.ram)
    @rule()
    def reopen(self) -> None:
        self.e.close()
        self.eng = self._open()

    @precondition(lambda self: not self.ram)
    @rule()
    def abandon_and_reopen(self) -> None:
        """Like a killed process: no checkpoint, the log is replayed on open."""
        eng = self.e
        eng.store.close()
        for o in eng.origins.values():
            o.file.close()
        self.eng = self._open()

    # -- checks ------------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        if self.eng is None:
            return
        infos = {i.snap: i for i in self.e.snapshots()}
        assert set(infos) == set(self.model)
        used: set[int] = set()
        for name, m in self.model.items():
            assert infos[name].valid
            assert infos[name].preserved_blocks == len(m.preserved), name
            changed = set()
            for off, length in self.e.changed_ranges("d", name):
                changed |= blocks_of(off, length)
            for b in range(NBLOCKS):
                lo, hi = b * BS, min(SIZE, (b + 1) * BS)
                if m.data[lo:hi] != self.origin[lo:hi]:
                    assert b in changed, (name, b)
        assert bytes(self.e.origin_device("d").pread(0, SIZE)) == bytes(self.origin)
        # no slot leaks: every allocated slot is referenced by someone
        for o in self.e.state.by_id.values():
            for slot, count in o.index.referenced_slots():
                used.update(range(slot, slot + count))
        slots = self.e.store.slots
        assert slots.end - slots.free_count == len(used)
        # and nothing is kept that no snapshot counts (each copy serves one at least)
        assert len(used) <= sum(len(m.preserved) for m in self.model.values())


class CompiledEngineModel(EngineModel):
    datapath = "compiled"


# unittest classes (hypothesis' TestCase) take no pytest parameters: one class per path
for machine in (EngineModel, CompiledEngineModel):
    machine.TestCase.settings = settings(
        max_examples=60,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestEngineModel = EngineModel.TestCase
TestCompiledEngineModel = CompiledEngineModel.TestCase
