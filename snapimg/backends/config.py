"""What ``snapimg serve`` asks of a backend: the parsed command line, checked.

Every backend module exposes ``async def start(config: ServeConfig) -> Backend`` that
returns once the NBD exports accept connections (see :mod:`snapimg.cli.serve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from snapimg.nbd.uri import unix_uri

Durability = Literal["default", "strict"]


@dataclass(frozen=True)
class ServeConfig:
    origins: dict[str, Path]  # export name -> raw image, in command-line order
    socket: Path  # NBD unix socket
    store_dir: Path
    block_size: int
    durability: Durability = "default"
    tcp: tuple[str, int] | None = None  # (host, port) to listen on as well
    tls_cert: Path | None = None  # with tls_key: TLS required on every connection
    tls_key: Path | None = None
    cbw_timeout: float | None = None  # seconds an origin write waits for its copies

    def uri(self, export: str) -> str:
        """The NBD URI of ``export`` on the unix socket, percent-encoded."""
        return unix_uri(export, self.socket)
