"""``snapimg inspect`` of an image or NBD export: the report as a JSON-ready dict.

The dict is the stable schema of docs/inspect-json.md; the human tables are rendered
from it (:mod:`snapimg.inspect.report`), so both always say the same.
"""

from __future__ import annotations

from typing import Any

from snapimg.inspect.allocation import allocation_summary
from snapimg.inspect.filesystems import probe_filesystem
from snapimg.inspect.findings import Finding
from snapimg.inspect.partitions import read_partition_table
from snapimg.inspect.source import NbdSource, Source

SCHEMA_VERSION = 1


def inspect_source(src: Source) -> dict[str, Any]:
    findings: list[Finding] = []
    table, table_findings = read_partition_table(src)
    findings += table_findings
    partitions: list[dict[str, Any]] = []
    whole_fs: dict[str, Any] | None = None
    if table is None:
        fs, fs_findings = probe_filesystem(src, 0, src.size, "disk")
        findings += fs_findings
        whole_fs = fs.to_json() if fs else None
        signed = src.size >= 512 and src.pread(510, 2) == b"\x55\xaa"
        if fs is None and not fs_findings and signed:
            findings.append(
                Finding(
                    "warning",
                    "disk",
                    "sector 0 has a boot signature but no valid partition table or filesystem",
                )
            )
    else:
        for p in table.partitions:
            entry = p.to_json()
            entry["filesystem"] = None
            if not p.container and p.start < src.size:
                fs, fs_findings = probe_filesystem(src, p.start, p.size, f"partition {p.index}")
                findings += fs_findings
                entry["filesystem"] = fs.to_json() if fs else None
            partitions.append(entry)
    return {
        "schema": SCHEMA_VERSION,
        "target": src.name,
        "backup": src.backup,
        "kind": "nbd" if isinstance(src, NbdSource) and src.format == "raw" else "image",
        "format": src.format,
        "virtual_size": src.size,
        "allocation": allocation_summary(src).to_json(),
        "partition_table": None
        if table is None
        else {"type": table.kind, "id": table.id, "sector_size": table.sector_size},
        "partitions": partitions,
        "filesystem": whole_fs,
        "findings": [f.to_json() for f in findings],
    }
