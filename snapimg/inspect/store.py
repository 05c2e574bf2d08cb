"""``snapimg inspect STORE_DIR``: a preservation store and its snapshots, read-only.

The store is parsed with the engine's own reader (:func:`snapimg.engine.store.read_store`
and :class:`snapimg.engine.state.StoreState`, format in docs/store-format.md) without
taking its lock, so a store that ``snapimg serve`` has open can be looked at too (the
report then says so: ``in_use``).  Nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from snapimg.engine.engine import current_boot_id
from snapimg.engine.state import StoreState
from snapimg.engine.store import DATA, LOCK, read_store
from snapimg.errors import StoreError, UsageError
from snapimg.inspect.image import SCHEMA_VERSION
from snapimg.inspect.report import format_table, size_cell
from snapimg.inspect.source import Source


def _in_use(path: Path) -> int | None:
    """The pid holding the store's flock, from /proc/locks (None: nobody)."""
    try:
        st = os.stat(path / LOCK)
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
            return int(parts[4])
    return None


def inspect_store(path: Path) -> dict[str, Any]:
    pid = _in_use(path)
    try:
        loaded = read_store(path, same_boot=True)
    except OSError as err:
        raise StoreError(f"cannot read store {path}: {err.strerror or err}") from None
    if loaded is None:
        raise UsageError(f"{path} is a directory but not a snapimg store (no store.meta)")
    hdr = loaded.header
    state = StoreState(hdr.block_size)
    for rec in [*loaded.checkpoint, *loaded.tail]:
        state.apply(rec)
    restarted = not hdr.clean and pid is None and hdr.boot_id != current_boot_id()
    bs = hdr.block_size
    origins = []
    for entry in state.by_id.values():
        snaps = []
        for s in sorted(entry.index.snaps.values(), key=lambda s: s.gen):
            info = s.info(bs).to_json()
            info["fill_percent"] = (
                round(100 * info["preserved_bytes"] / s.max_size, 1) if s.max_size else None
            )
            if restarted and not hdr.strict and s.valid:
                info["note"] = "will be invalidated on open: the host restarted"
            snaps.append(info)
        origins.append(
            {
                "name": entry.name,
                "size": entry.size,
                "fingerprint": entry.fingerprint,
                "snapshots": snaps,
            }
        )
    return {
        "schema": SCHEMA_VERSION,
        "target": str(path),
        "kind": "store",
        "block_size": bs,
        "uuid": hdr.uuid.hex(),
        "clean": hdr.clean,
        "durability": "strict" if hdr.strict else "default",
        "in_use_by_pid": pid,
        "data_file_bytes": (path / DATA).stat().st_size,
        "data_slots": loaded.data_slots,
        "origins": origins,
    }


def render_store(rep: dict[str, Any]) -> str:
    pid = rep["in_use_by_pid"]
    head = [
        ("Store", rep["target"]),
        ("Block size", size_cell(rep["block_size"])),
        (
            "State",
            ("open" if pid else "closed")
            + (", clean" if rep["clean"] else ", unclean")
            + (f" (in use by pid {pid})" if pid else ""),
        ),
        ("Durability", rep["durability"]),
        ("Data file", size_cell(rep["data_file_bytes"])),
    ]
    out = [f"{k + ':':<12}{v}" for k, v in head]
    for o in rep["origins"]:
        out += ["", f"Origin {o['name']}: {size_cell(o['size'])}, identity {o['fingerprint']}"]
        if not o["snapshots"]:
            out.append("  no snapshots")
            continue
        rows = [
            [
                s["snapshot"],
                s["state"],
                s["created"][:19].replace("T", " "),
                str(s["preserved_blocks"]),
                size_cell(s["preserved_bytes"]),
                size_cell(s["max_size"]),
                "-" if s["fill_percent"] is None else f"{s['fill_percent']:.1f}%",
                s["reason"] or s.get("note") or "-",
            ]
            for s in o["snapshots"]
        ]
        headers = ["SNAPSHOT", "STATE", "CREATED", "BLOCKS", "PRESERVED", "MAX", "FILL", "REASON"]
        out.append(format_table(headers, rows, right=(3, 4, 5, 6)))
    return "\n".join(out)


def open_store_source(path: Path) -> Source:
    raise UsageError(
        f"{path} is a store directory: it holds snapshots, not one image; "
        "read a snapshot through its nbd:// export (snapimg serve)"
    )
