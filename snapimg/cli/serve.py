"""``snapimg serve``: serve raw images and their snapshots over NBD until SIGINT/SIGTERM.

The backend (native engine or qemu-storage-daemon) is picked by name from
:data:`_BACKENDS`; each backend module exposes ``async def start(ServeConfig) -> Backend``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from snapimg.backends.base import Backend
from snapimg.backends.config import Durability, ServeConfig
from snapimg.control.quiesce_notes import QuiesceNotes
from snapimg.control.server import ControlServer
from snapimg.errors import UsageError
from snapimg.nbd.server import prepare_unix_socket_path
from snapimg.units import parse_block_size

_BACKENDS = {
    "native": "snapimg.backends.native",
    "qsd": "snapimg.backends.qsd",
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve raw images and their snapshots over NBD (foreground)"
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="[NAME=]IMAGE",
        help="raw image to serve as export NAME (default: the file stem)",
    )
    p.add_argument("--socket", type=Path, required=True, help="NBD unix socket to create")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also serve NBD on this TCP address")
    p.add_argument("--control", type=Path, required=True, help="control unix socket to create")
    p.add_argument(
        "--store-dir",
        type=Path,
        required=True,
        help="directory of the preservation store (snapshots found there reopen)",
    )
    p.add_argument("--block-size", default="64K", help="copy-before-write block size (64K)")
    p.add_argument(
        "--durability",
        choices=("default", "strict"),
        default="default",
        help="strict: store writes are synced before the origin write",
    )
    p.add_argument("--pid-file", type=Path, help="write the pid here once ready")
    p.add_argument(
        "--backend",
        choices=tuple(_BACKENDS),
        default="native",
        help="data plane: native engine (default) or qemu-storage-daemon",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: require TLS on NBD")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--insecure", action="store_true", help="allow --tcp on a non-loopback address without TLS"
    )
    p.set_defaults(func=_serve)


def parse_origins(specs: list[str]) -> dict[str, Path]:
    origins: dict[str, Path] = {}
    for spec in specs:
        name, sep, image = spec.partition("=")
        if not sep or "/" in name:
            name, image = Path(spec).stem, spec
        if not name or "@" in name or "/" in name or name != name.strip():
            raise UsageError(f"bad export name {name!r} in {spec!r}: no '@', '/' or spaces")
        if name in origins:
            raise UsageError(f"duplicate export name {name!r}")
        path = Path(image)
        if not path.exists():
            raise UsageError(f"image {image} does not exist")
        if path.is_dir():
            raise UsageError(f"image {image} is a directory")
        origins[name] = path.resolve()
    return origins


def parse_tcp(text: str, tls: bool, insecure: bool) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad --tcp {text!r}: expected HOST:PORT")
    if host == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise UsageError(f"bad --tcp host {host!r}: give an IP address") from None
    if not loopback and not tls and not insecure:
        raise UsageError(
            f"refusing to serve NBD on non-loopback {host} without TLS "
            "(give --tls-cert and --tls-key, or --insecure)"
        )
    return host, int(port_text)


def build_config(args: argparse.Namespace) -> ServeConfig:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise UsageError(f"TLS file {path} does not exist")
    origins = parse_origins(args.images)
    tcp = parse_tcp(args.tcp, args.tls_cert is not None, args.insecure) if args.tcp else None
    if args.store_dir.exists() and not args.store_dir.is_dir():
        raise UsageError(f"--store-dir {args.store_dir} is not a directory")
    if not args.store_dir.parent.is_dir():
        raise UsageError(f"--store-dir {args.store_dir}: no such parent directory")
    if args.socket.resolve() == args.control.resolve():
        raise UsageError("--socket and --control must differ")
    return ServeConfig(
        origins=origins,
        socket=args.socket.absolute(),
        store_dir=args.store_dir.absolute(),
        block_size=parse_block_size(args.block_size),
        durability=cast(Durability, args.durability),
        tcp=tcp,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


async def start_backend(kind: str, config: ServeConfig) -> Backend:
    module = importlib.import_module(_BACKENDS[kind])
    backend: Backend = await module.start(config)
    return backend


def _serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    logging.basicConfig(level=logging.WARNING, format="snapimg serve: %(message)s")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_run(config, args.backend, args.control.absolute(), args.pid_file))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: it moves NBD payloads with fewer copies and wakeups."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run(config: ServeConfig, kind: str, control_path: Path, pid_file: Path | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Sockets in use are refused before anything is opened or created.
    prepare_unix_socket_path(config.socket)
    prepare_unix_socket_path(control_path)
    config.store_dir.mkdir(exist_ok=True)
    backend = await start_backend(kind, config)
    control = ControlServer(backend, QuiesceNotes(config.store_dir))
    try:
        await control.listen(control_path)
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
        names = [e.name for e in await backend.exports()]
        tcp = f" tcp={config.tcp[0]}:{config.tcp[1]}" if config.tcp else ""
        print(
            f"snapimg serve: ready socket={config.socket}{tcp} control={control_path} "
            f"exports={','.join(names)} pid={os.getpid()}",
            flush=True,
        )
        death = await _until_stopped_or_dead(stop, backend)
    finally:
        await control.close()
        await backend.close()
        if pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
    sys.stdout.flush()
    if death is not None:
        print(f"snapimg serve: {death}", file=sys.stderr)
        return 1
    return 0


async def _until_stopped_or_dead(stop: asyncio.Event, backend: Backend) -> str | None:
    """Wait for SIGINT/SIGTERM (-> None) or for the backend to die on its own (-> why).

    A backend may offer ``async def died() -> str`` (the qsd backend: its daemon exited)."""
    died: Callable[[], Awaitable[str]] | None = getattr(backend, "died", None)
    if died is None:
        await stop.wait()
        return None
    stopped = asyncio.ensure_future(stop.wait())
    dead = asyncio.ensure_future(died())
    try:
        await asyncio.wait({stopped, dead}, return_when=asyncio.FIRST_COMPLETED)
        return dead.result() if dead.done() and not stopped.done() else None
    finally:
        stopped.cancel()
        dead.cancel()
