"""``snapimg serve``: serve raw images and their snapshots over NBD until SIGINT/SIGTERM.

The backend (native engine or qemu-storage-daemon) is picked by name from
:data:`_BACKENDS`; each backend module exposes ``async def start(ServeConfig) -> Backend``.
Before anything is created, every origin is locked as QEMU locks a VM's disk
(:mod:`snapimg.imagelock`), for the server's whole life.  A command that fails at start
leaves nothing behind: no socket, no new store directory, no pid file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import os
import shutil
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from snapimg.backends.base import Backend
from snapimg.backends.config import Durability, ServeConfig
from snapimg.cli.common import add_control, add_size, notice
from snapimg.control.quiesce_notes import QuiesceNotes
from snapimg.control.server import ControlServer
from snapimg.errors import UsageError
from snapimg.imagelock import ImageLock
from snapimg.malloc import pin_mmap_threshold
from snapimg.names import check_export_name
from snapimg.sockpath import prepare_unix_socket_path
from snapimg.units import parse_block_size

_BACKENDS = {
    "native": "snapimg.backends.native",
    "qsd": "snapimg.backends.qsd",
}
SECTOR = 512  # QEMU's NBD client sees sizes in whole sectors


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve raw images and their snapshots over NBD (until SIGTERM)"
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="[NAME=]IMAGE",
        help="raw image file or block device to serve read-write as export NAME "
        "(default NAME: the file name without its extension)",
    )
    p.add_argument(
        "--socket", type=Path, required=True, metavar="PATH", help="NBD unix socket to create"
    )
    p.add_argument("--tcp", metavar="HOST:PORT", help="also serve NBD on this TCP address")
    add_control(p, help="control unix socket to create (for snapimg snapshot ...)")
    p.add_argument(
        "--store-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of the preservation store, created if missing (its parent must "
        "exist); snapshots found there reopen",
    )
    add_size(
        p,
        "--block-size",
        "copy-before-write block size, a power of two from 4K to 1M",
        example="64K",
        default="64K",
    )
    p.add_argument(
        "--durability",
        choices=("default", "strict"),
        default="default",
        help="strict: store writes are synced before the origin write, so snapshots "
        "survive power loss (default: %(default)s)",
    )
    p.add_argument(
        "--cbw-timeout",
        type=float,
        metavar="SECONDS",
        help="an origin write waits at most this long for its copies into the store; "
        "then a snapshot with --on-full invalidate is invalidated (if the store can still "
        "record that) and the write goes on, else the write fails with EIO and the "
        "snapshot stays exact (default: no limit; native backend only)",
    )
    p.add_argument(
        "--pid-file",
        type=Path,
        metavar="PATH",
        help="write the server's pid here once ready (removed at exit)",
    )
    p.add_argument(
        "--daemonize",
        action="store_true",
        help="return once the server is ready, leaving it running in the background "
        "(stop it with SIGTERM, e.g. kill $(cat PID_FILE)); its later log lines go to "
        "stderr only if that is a file (2>>serve.log)",
    )
    p.add_argument(
        "--backend",
        choices=tuple(_BACKENDS),
        default="native",
        help="data plane: native engine or qemu-storage-daemon (default: %(default)s)",
    )
    p.add_argument(
        "--tls-cert", type=Path, metavar="PATH", help="PEM certificate: require TLS on NBD"
    )
    p.add_argument("--tls-key", type=Path, metavar="PATH", help="PEM private key of --tls-cert")
    p.add_argument(
        "--insecure", action="store_true", help="allow --tcp on a non-loopback address without TLS"
    )
    p.set_defaults(func=_serve)


def parse_origins(specs: list[str]) -> dict[str, Path]:
    origins: dict[str, Path] = {}
    seen: dict[tuple[int, int], str] = {}
    for spec in specs:
        name, sep, image = spec.partition("=")
        if not sep or "/" in name:
            name, image = Path(spec).stem, spec
        try:
            check_export_name(name)
        except UsageError as err:
            raise UsageError(f"{err} (in {spec!r}; give NAME=IMAGE)") from None
        if name in origins:
            raise UsageError(f"duplicate export name {name!r}")
        path = Path(image)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UsageError(f"image {image} does not exist") from None
        except OSError as err:
            raise UsageError(f"image {image}: {err.strerror}") from None
        if path.is_dir():
            raise UsageError(f"image {image} is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"image {image} is not a regular file or block device")
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise UsageError(
                f"image {image} is given twice: export {name!r} and export {seen[key]!r} "
                "would be the same file"
            )
        seen[key] = name
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


def _check_dir_for(path: Path, what: str) -> None:
    """``path`` (a file or directory to create) must have an existing, writable parent."""
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: directory {parent} is not writable")


def check_store_dir(store_dir: Path) -> None:
    if store_dir.exists():
        if not store_dir.is_dir():
            raise UsageError(f"--store-dir {store_dir} is not a directory")
        if not os.access(store_dir, os.R_OK | os.W_OK | os.X_OK):
            raise UsageError(f"--store-dir {store_dir} is not writable")
    else:
        _check_dir_for(store_dir, "--store-dir")


def build_config(args: argparse.Namespace) -> ServeConfig:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise UsageError(f"TLS file {path} does not exist")
    origins = parse_origins(args.images)
    tcp = parse_tcp(args.tcp, args.tls_cert is not None, args.insecure) if args.tcp else None
    check_store_dir(args.store_dir)
    if args.pid_file is not None:
        if args.pid_file.is_dir():
            raise UsageError(f"--pid-file {args.pid_file} is a directory")
        _check_dir_for(args.pid_file, "--pid-file")
    if args.socket.absolute() == args.control.absolute():
        raise UsageError("--socket and --control must differ")
    if args.cbw_timeout is not None:
        if not 0 < args.cbw_timeout <= 3600:
            raise UsageError(
                f"bad --cbw-timeout {args.cbw_timeout:g}: expected 0 < SECONDS <= 3600"
            )
        if args.backend != "native":
            raise UsageError("--cbw-timeout needs the native backend (QEMU's backup job has none)")
    return ServeConfig(
        origins=origins,
        socket=args.socket.absolute(),
        store_dir=args.store_dir.absolute(),
        block_size=parse_block_size(args.block_size),
        durability=cast(Durability, args.durability),
        tcp=tcp,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cbw_timeout=args.cbw_timeout,
    )


async def start_backend(kind: str, config: ServeConfig) -> Backend:
    module = importlib.import_module(_BACKENDS[kind])
    backend: Backend = await module.start(config)
    return backend


def _serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    pin_mmap_threshold()  # resident memory that follows the load, not its history
    ready_pipe: IO[str] | None = None
    if args.daemonize:
        ready_pipe = _daemonize()
        if ready_pipe is None:
            return 0  # the parent: the server is ready (its line was printed)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_run(args, config, ready_pipe))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: it moves NBD payloads with fewer copies and wakeups."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _daemonize() -> IO[str] | None:
    """Fork; the parent waits for the child's ready line, prints it and returns None; the
    child (in a new session) gets the pipe to send its ready line on.  Called before any
    thread or event loop exists.  A child that fails before ready prints its error on the
    inherited stderr and the parent exits with the child's status."""
    sys.stdout.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        return os.fdopen(w, "w")
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.read()
    if line:
        sys.stdout.write(line.lstrip("\n"))  # a lone newline: ready, but quiet
        sys.stdout.flush()
        return None
    _, status = os.waitpid(pid, 0)
    raise SystemExit(os.waitstatus_to_exitcode(status) or 1)


@contextlib.contextmanager
def _image_locks(config: ServeConfig) -> Iterator[list[ImageLock]]:
    """QEMU's locks on every origin, held while serving (QEMU tools then refuse to write)."""
    locks: list[ImageLock] = []
    try:
        for path in config.origins.values():
            locks.append(ImageLock.acquire(path))
        yield locks
    finally:
        for lock in locks:
            lock.release()


@contextlib.contextmanager
def _store_dir(path: Path) -> Iterator[None]:
    """Create the store directory if missing; remove it again if serving fails to start."""
    created = not path.exists()
    try:
        path.mkdir(exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --store-dir {path}: {err.strerror}") from None
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise


async def _run(args: argparse.Namespace, config: ServeConfig, ready_pipe: IO[str] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[int] = []

    def on_signal(signum: int) -> None:
        stopped_by.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    control_path: Path = args.control.absolute()
    pid_file: Path | None = args.pid_file
    # Refusals come before anything is opened or created.
    prepare_unix_socket_path(config.socket)
    prepare_unix_socket_path(control_path)
    wrote_pid = False
    try:
        with _image_locks(config):
            with _store_dir(config.store_dir):
                backend = await start_backend(args.backend, config)
                control = ControlServer(backend, QuiesceNotes(config.store_dir))
                try:
                    await control.listen(control_path)
                    if pid_file is not None:
                        pid_file.write_text(f"{os.getpid()}\n")
                        wrote_pid = True
                except BaseException:
                    await control.close()
                    await backend.close()
                    raise
            try:
                exports = await backend.exports()
                for warning in odd_size_warnings(config, {e.name: e.size for e in exports}):
                    notice(args, f"warning: {warning}")
                tcp = f" tcp={config.tcp[0]}:{config.tcp[1]}" if config.tcp else ""
                ready = (
                    f"snapimg serve: ready socket={config.socket}{tcp} control={control_path} "
                    f"exports={','.join(e.name for e in exports)} pid={os.getpid()} "
                    f"datapath={backend.datapath}\n"
                )
                _announce(args, ready, ready_pipe)
                death = await _until_stopped_or_dead(stop, backend)
            finally:
                await control.close()
                await backend.close()
    finally:  # last: a gone pid file means the images are unlocked and the sockets gone
        if wrote_pid and pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
    sys.stdout.flush()
    if death is not None:
        print(f"snapimg serve: {death}", file=sys.stderr)
        return 1
    return 128 + stopped_by[0] if stopped_by else 0


def _announce(args: argparse.Namespace, ready: str, pipe: IO[str] | None) -> None:
    """The ready line: on stdout, or through the pipe to the parent of a daemon."""
    text = "" if args.quiet else ready
    if pipe is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    pipe.write(text or "\n")  # something, so that the parent knows we are ready
    pipe.close()
    # Let go of the caller's terminal and pipes ($(...) would wait for them forever);
    # a regular file as stderr (2>>serve.log) keeps the daemon's log lines.
    devnull = os.open(os.devnull, os.O_RDWR)
    keep_stderr = stat.S_ISREG(os.fstat(2).st_mode)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def odd_size_warnings(config: ServeConfig, exported: dict[str, int]) -> Iterator[str]:
    """Say what clients see of an image whose size is not a multiple of 512."""
    for name, path in config.origins.items():
        size = path.stat().st_size
        if size % SECTOR == 0:
            continue  # also block devices (st_size 0): their size is in whole sectors
        rounded = -(-size // SECTOR) * SECTOR
        seen = exported.get(name, size)
        if seen == size:
            yield (
                f"{name} ({path}) is {size} bytes, not a multiple of {SECTOR}: QEMU clients "
                f"(qemu-img, qemu-io, VMs) see {rounded} bytes, the last {rounded - size} "
                f"reading as zeros and refusing writes; nbdinfo and nbdcopy see {size}"
            )
        else:
            yield (
                f"{name} ({path}) is {size} bytes, not a multiple of {SECTOR}: it is "
                f"exported as {seen} bytes, the last {seen - size} reading as zeros; "
                f"a write there makes the file {seen} bytes long"
            )


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
