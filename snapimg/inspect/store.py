"""``snapimg inspect STORE_DIR``: a preservation store and its snapshots (read-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapimg.errors import UsageError
from snapimg.inspect.source import Source


def inspect_store(path: Path) -> dict[str, Any]:
    raise UsageError(f"{path}: inspecting store directories is not available yet")


def render_store(rep: dict[str, Any]) -> str:
    raise UsageError("inspecting store directories is not available yet")


def open_store_source(path: Path) -> Source:
    raise UsageError(
        f"{path} is a store directory: it holds snapshots, not one image; "
        "read a snapshot through its nbd:// export"
    )
