"""Command-line targets: ``PATH``, ``nbd[+unix]://...`` URIs, and the ``TARGET:PART`` suffix."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from snapimg.errors import UsageError
from snapimg.inspect.qemu_image import QemuImageSource, image_info
from snapimg.inspect.source import FileSource, NbdSource, Source, is_nbd_uri

_PART_RE = re.compile(r"^(.*):(\d+)$")


def split_part(target: str) -> tuple[str, int | None]:
    """``"disk.img:2"`` -> ``("disk.img", 2)``; a path or URI without a suffix -> ``(t, None)``.

    An existing path wins over the suffix reading; in an NBD URI a trailing ``:N`` that is
    the port of the authority (``nbd://host:10809``) is not a partition.
    """
    if not is_nbd_uri(target) and Path(target).exists():
        return target, None
    m = _PART_RE.match(target)
    if not m:
        return target, None
    base, part = m.group(1), int(m.group(2))
    if is_nbd_uri(target):
        whole = urlsplit(target)
        if whole.port is not None and not whole.path and not whole.query:
            return target, None
    if part < 1:
        raise UsageError(f"bad partition number {part} in {target!r}: they count from 1")
    return base, part


def open_target(target: str, backup: str | None = None) -> Source:
    """Open an image path, NBD URI or backup point (a backup directory: its newest point,
    or point ``backup``) read-only (store directories: see :mod:`.store`)."""
    if backup is not None and is_nbd_uri(target):
        raise UsageError("--backup goes with a backup directory, not an NBD URI")
    if is_nbd_uri(target):
        return NbdSource(target)
    path = Path(target)
    if not path.exists():
        raise UsageError(f"{target}: no such file, and not an nbd:// URI")
    from snapimg.inspect.point import is_backup_dir, open_point

    if backup is not None or is_backup_dir(path):
        return open_point(path, backup)
    if path.is_dir():
        from snapimg.inspect.store import open_store_source

        return open_store_source(path)
    fmt = str(image_info(path).get("format", "raw"))
    if fmt == "raw":
        return FileSource(path)
    return QemuImageSource(path, fmt)
