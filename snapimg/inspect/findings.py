"""Findings: what is damaged or odd in an image, reported instead of raised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """``severity`` error: damaged; warning: odd but usable.  ``where``: "disk", "partition 2"."""

    severity: Severity
    where: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"
