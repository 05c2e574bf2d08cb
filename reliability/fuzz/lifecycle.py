"""Target ``lifecycle-compiled``: the request streams of ``transmission-compiled`` while
the snapshot lifecycle turns between inputs.

With fixed snapshots every block of ``fuzz`` is preserved for the newest one after the
first inputs, and the compiled data path's copy-before-write only checks entries from
then on.  Here the transient snapshot ``fuzz@t`` is verified, dropped and created anew
every :data:`CYCLE` inputs, in turn in each configuration of :data:`CONFIGS`: read-only
without a limit (C installs the first copies itself), read-only with a limit of
:data:`LIMIT` and either ``--on-full`` policy (C stops at the limit, Python applies the
policy), and writable (Python decides: private and released blocks).  Dropping frees
store slots that later copies reuse.  The host's writable ``fuzz@w`` is dropped at the
start: its private blocks would keep C's first-copy installs off for good (C installs
only while no live snapshot has exclusions).  Export index 2 (byte 0, bits 0-1) is
``fuzz@t`` instead of ``fuzz@w``.

Oracles besides those of the transmission targets: data read from a read-only
``fuzz@t`` is its creation content; at the end of its cycle ``fuzz@t`` is valid unless
it reached its limit under ``invalidate``, and, valid and read-only, reads its creation
content.
"""

from __future__ import annotations

from dataclasses import dataclass

from reliability.fuzz import wire
from reliability.fuzz.host import BLOCK, SIZE, Host
from reliability.fuzz.targets import FuzzFailure, TransmissionTarget
from snapimg.blockdev import BlockDevice
from snapimg.snapinfo import OnFull

CYCLE = 20  # inputs per transient snapshot
LIMIT = 4 * BLOCK  # max size of the limited configurations


@dataclass(frozen=True)
class Config:
    writable: bool
    max_size: int | None
    on_full: OnFull


CONFIGS = (
    Config(False, None, "invalidate"),
    Config(False, LIMIT, "invalidate"),
    Config(False, None, "invalidate"),
    Config(False, LIMIT, "block-writes"),
    Config(True, None, "invalidate"),
)


class LifecycleTarget(TransmissionTarget):
    def __init__(self, host: Host) -> None:
        super().__init__(host, "compiled")
        self.name = "lifecycle-compiled"
        if "fuzz@w" in host.exports:
            host.exports.remove("fuzz@w")
            host.engine.drop_snapshot("fuzz", "w")
        self.cycles = 0
        self.config = CONFIGS[0]
        self.created = b""  # fuzz@t's content at its creation
        self.transient: BlockDevice | None = None
        self._create()

    def _create(self) -> None:
        self.config = CONFIGS[self.cycles % len(CONFIGS)]
        self.created = self.host.device("fuzz").pread(0, SIZE)  # no writer runs now
        c = self.config
        self.host.engine.create_snapshot("fuzz", "t", c.max_size, c.writable, c.on_full)
        self.transient = self.host.engine.snapshot_device("fuzz", "t")

    def _verify(self) -> str | None:
        info = next(i for i in self.host.engine.snapshots() if (i.origin, i.snap) == ("fuzz", "t"))
        c = self.config
        if not info.valid:
            if c.max_size is not None and c.on_full == "invalidate" and info.reason:
                return None
            return f"fuzz@t ({c}) became invalid: {info.reason}"
        if c.max_size is not None and info.preserved_bytes > c.max_size:
            return f"fuzz@t ({c}) holds {info.preserved_bytes} bytes"
        if not c.writable and self.host.engine.snapshot_device("fuzz", "t").pread(0, SIZE) \
                != self.created:  # fmt: skip
            return f"fuzz@t ({c}) no longer reads its creation content"
        return None

    def turn(self) -> None:
        """End this cycle's snapshot (verified) and start the next one."""
        if bad := self._verify():
            raise FuzzFailure(bad)
        self.host.engine.drop_snapshot("fuzz", "t")
        self.cycles += 1
        self._create()

    def _check_transient_read(self, offset: int, data: bytes) -> str | None:
        if data != self.created[offset : offset + len(data)]:
            return f"fuzz@t ({self.config}) read at {offset} (+{len(data)}) returned other data"
        return None

    def export(self, index: int) -> tuple[BlockDevice, wire.ReadCheck | None]:
        if index % 3 != 2 or self.transient is None:
            return super().export(index)
        return self.transient, None if self.config.writable else self._check_transient_read

    def run(self, data: bytes) -> None:
        if self.inputs and self.inputs % CYCLE == 0:
            self.turn()
        super().run(data)
