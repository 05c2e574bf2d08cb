"""Human output: aligned tables rendered from the JSON-ready reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from snapimg.units import format_size


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; columns listed in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def size_cell(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _text(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _fs_cells(fs: dict[str, Any] | None) -> list[str]:
    if fs is None:
        return ["-"] * 6
    return [
        fs["type"],
        _text(fs["variant"]),
        _text(fs["label"]),
        _text(fs["uuid"]),
        size_cell(fs["size"]),
        size_cell(fs["used"]),
    ]


_FS_HEADERS = ["FS", "VARIANT", "LABEL", "UUID", "FS SIZE", "USED"]


def render_inspect(rep: dict[str, Any]) -> str:
    alloc = rep["allocation"]
    head = [
        (
            "Target",
            rep["target"] + (f" (backup point {rep['backup']})" if rep.get("backup") else ""),
        ),
        ("Format", rep["format"]),
        ("Virtual size", f"{format_size(rep['virtual_size'])} ({rep['virtual_size']} bytes)"),
        (
            "Allocation",
            f"data {format_size(alloc['data'])}, zero {format_size(alloc['zero'])}, "
            f"hole {format_size(alloc['hole'])}",
        ),
    ]
    table = rep["partition_table"]
    head.append(
        ("Partition table", "none" if table is None else f"{table['type']} (id {table['id']})")
    )
    width = max(len(k) for k, _ in head) + 2
    out = [f"{k + ':':<{width}}{v}" for k, v in head]
    if rep["partitions"]:
        rows = [
            [
                str(p["index"]),
                size_cell(p["start"]),
                size_cell(p["size"]),
                _text(p["type_name"] or p["type"]),
                _text(p["name"]),
                "*" if p["bootable"] else "",
                *_fs_cells(p["filesystem"]),
            ]
            for p in rep["partitions"]
        ]
        headers = ["#", "START", "SIZE", "TYPE", "NAME", "BOOT", *_FS_HEADERS]
        out += ["", format_table(headers, rows, right=(0, 1, 2, 10, 11))]
    elif rep["filesystem"] is not None:
        out += ["", format_table(_FS_HEADERS, [_fs_cells(rep["filesystem"])], right=(4, 5))]
    out += render_findings(rep["findings"])
    return "\n".join(out)


def render_findings(findings: list[dict[str, Any]]) -> list[str]:
    if not findings:
        return []
    rows = [[f["severity"], f["where"], f["message"]] for f in findings]
    return ["", "Findings:", format_table(["SEVERITY", "WHERE", "MESSAGE"], rows)]
