"""Opening a store directory: read, check, replay, then a fresh checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from snapimg.engine import records as R
from snapimg.engine.origin import Origin
from snapimg.engine.state import StoreState
from snapimg.engine.store import Fault, FileStore, Store, read_store
from snapimg.engine.table import Table
from snapimg.errors import StoreError, StoreFormatError, StoreMismatchError

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


def open_file_store(
    path: Path,
    files: dict[str, Origin],
    block_size: int,
    strict: bool,
    boot: str,
    fault: Fault | None,
    table: Callable[[int], Table] | None = None,
    store_class: Callable[[Path, int, bool, str, Fault | None], FileStore] = FileStore,
) -> tuple[FileStore, StoreState]:
    """Lock, read and check the store in ``path`` against ``files``, replay it, register
    new origins, then write a fresh checkpoint.  Nothing is written before every check
    passed."""
    store = store_class(path, block_size, strict, boot, fault)
    store.lock()
    try:
        state = StoreState(block_size) if table is None else StoreState(block_size, table)
        loaded = read_store(path, boot_id=boot)
        if loaded is not None:
            hdr = loaded.header
            if hdr.block_size != block_size:
                raise StoreMismatchError(
                    f"store {path} uses block size {hdr.block_size}, not {block_size}"
                )
            for rec in loaded.checkpoint:
                state.apply(rec)
            _check_identity(path, state, files)
            for rec in loaded.tail:
                state.apply(rec)
            if not hdr.clean and hdr.boot_id != boot and not hdr.strict:
                _invalidate_all(state, "the host restarted while the store was open")
            _rebuild_slots(path, store, state, loaded.data_slots)
        for name, f in files.items():
            if name not in state.by_name:
                state.register(name, f.size, f.fingerprint(create_tag=True))
        blob = b"".join(R.encode(r) for r in state.checkpoint_records())
        store.start(loaded.header.uuid if loaded else None, blob)
    except OSError as err:
        store.close()
        raise StoreError(f"cannot open store {path}: {err.strerror or err}") from err
    except BaseException:
        store.close()
        raise
    return store, state


def _check_identity(path: Path, state: StoreState, files: dict[str, Origin]) -> None:
    for name, f in files.items():
        known = state.by_name.get(name)
        if known is None:
            # A file the store knows under another name: writes through this name would
            # bypass that origin's snapshots (silently wrong snapshots), so refuse.
            fp = f.fingerprint(create_tag=False)
            other = next((o for o in state.by_id.values() if o.fingerprint == fp), None)
            if other is not None and other.name not in files:
                raise StoreMismatchError(
                    f"store {path} already holds {f.path} as origin {other.name!r}: "
                    f"open it under that name, not {name!r}"
                )
            continue
        if known.size != f.size:
            raise StoreMismatchError(
                f"store {path} holds origin {name!r} of size {known.size}, "
                f"but {f.path} has size {f.size}"
            )
        fp = f.fingerprint(create_tag=False)
        if known.fingerprint != fp:
            raise StoreMismatchError(
                f"store {path} belongs to another file named {name!r} than {f.path} "
                f"(fingerprint {known.fingerprint} != {fp})"
            )


def _invalidate_all(state: StoreState, reason: str) -> None:
    now = time.time()
    for o in state.by_id.values():
        for s in list(o.index.snaps.values()):
            if s.valid:
                state.apply(R.InvalidateRec(o.id, s.gen, now, reason))


def _rebuild_slots(path: Path, store: Store, state: StoreState, data_slots: int) -> None:
    """Free every slot of the data area that no snapshot references."""
    used = bytearray(data_slots)
    for slot, count in state.referenced_runs():
        if slot + count > data_slots:
            raise StoreFormatError(
                f"store {path} is truncated: slot {slot + count - 1} is beyond its data area"
            )
        used[slot : slot + count] = b"\x01" * count
    store.slots.end = data_slots
    pos = 0
    while True:
        start = used.find(0, pos)
        if start < 0:
            break
        stop = used.find(1, start)
        if stop < 0:
            stop = data_slots
        store.slots.free(start, stop - start)
        pos = stop
