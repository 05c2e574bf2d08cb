"""Entry point of the ``snapimg`` command.

Each command group lives in its own module under :mod:`snapimg.cli` and exposes
``register(subparsers)``, which adds its sub-commands with ``set_defaults(func=...)``.
A command function takes the parsed ``argparse.Namespace`` and returns an exit status.
User mistakes and refused operations raise :class:`SnapimgError`: printed as one line,
never a traceback; so are operating-system errors on paths the user gave (``OSError``).
SIGINT ends a command with status 130 and SIGTERM with 143 (128 + the signal number);
``serve`` shuts down cleanly first.  Shared option conventions: :mod:`snapimg.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from snapimg import __version__, interrupts
from snapimg.cli.common import add_verbosity
from snapimg.errors import SnapimgError
from snapimg.units import SIZE_SYNTAX

# Command-group modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "snapimg.cli.demo",
    "snapimg.cli.serve",
    "snapimg.cli.snapshot",
    "snapimg.cli.inspect",
    "snapimg.cli.attach",
    "snapimg.cli.backup",
    "snapimg.cli.quiesce",
)

DESCRIPTION = (
    "snapimg takes consistent point-in-time snapshots of raw VM disk images while the VM "
    "keeps writing, serves images and snapshots over NBD, backs them up and looks inside."
)

EPILOG = f"""\
{textwrap.fill(SIZE_SYNTAX + ".", 79)}
Exit status: 0 success, 1 error (one line on stderr), 2 bad command line,
130 interrupted (SIGINT), 143 terminated (SIGTERM); diff: 0 same, 1 different, 2 error.
Run 'snapimg COMMAND --help' for a command's options; docs: README.md and docs/."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; keep it to one line and exit 2.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapimg",
        description=textwrap.fill(DESCRIPTION, 79),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"snapimg {__version__}")
    add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for leaf in _leaf_parsers(parser):
        add_verbosity(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers of runnable commands (``serve``, ``snapshot create``, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from _leaf_parsers(child)
                else:
                    yield child


# Commands that clean up after SIGINT/SIGTERM (drop snapshots, remove temporary files,
# stop daemons) and so must never be cut short; every other command is read-only or a
# single request, and is ended by the watchdog if a C library blocks its reaction.
_CLEANS_UP = ("serve", "backup", "restore", "verify", "prune", "demo", "attach", "detach")
_GRACE = 1.0  # seconds a command has to react to a signal before the watchdog ends it


class _Signalled:
    """SIGTERM raises KeyboardInterrupt as SIGINT does; the number decides the status.

    Python runs signal handlers only between bytecodes, so a command blocked inside C
    (libnbd waiting on a server that never answers retries its poll on EINTR) would not
    react.  For commands with nothing to clean up, a watchdog thread learns of the signal
    through the wakeup fd (written by the C-level handler at once) and, if the command
    has not ended ``_GRACE`` seconds later, prints the line and exits 128 + signal.
    """

    number = signal.SIGINT
    received = False
    reported = threading.Event()

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        cls.number = signal.Signals(signum)
        cls.received = True
        interrupts.deliver()  # (held back while a QEMU tool is being started)

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, cls.handler)
        signal.signal(signal.SIGINT, cls.handler)

    @classmethod
    def start_watchdog(cls, command: str) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        threading.Thread(
            target=cls._watch, args=(r, command), name="signal-watchdog", daemon=True
        ).start()

    @classmethod
    def _watch(cls, r: int, command: str) -> None:
        signum = os.read(r, 1)[0]
        if cls.reported.wait(_GRACE):
            time.sleep(_GRACE)  # reported, but still here: a thread blocks the exit
        else:
            print(f"snapimg {command}: {_what(signum)}", file=sys.stderr, flush=True)
        os._exit(exit_status_of_signal(signum))


def _what(signum: int) -> str:
    return "terminated" if signum == signal.SIGTERM else "interrupted"


def exit_status_of_signal(signum: int) -> int:
    """The shell's status for a command ended by ``signum``: 130 SIGINT, 143 SIGTERM."""
    return 128 + signum


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if args.quiet:
        level = logging.ERROR
    elif args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1:
        level = logging.INFO
    logging.basicConfig(level=level, format=f"snapimg {args.command}: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    _Signalled.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.command not in _CLEANS_UP:
        _Signalled.start_watchdog(args.command)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except (SnapimgError, OSError) as err:
        if _Signalled.received:  # a library turned the interruption into its own error
            return _interrupted(args.command)
        if isinstance(err, BrokenPipeError):
            return 141
        text = _os_error_line(err) if isinstance(err, OSError) else str(err)
        print(f"snapimg {args.command}: {text}", file=sys.stderr)
        return 1


def _interrupted(command: str) -> int:
    number = _Signalled.number
    print(f"snapimg {command}: {_what(number)}", file=sys.stderr, flush=True)
    _Signalled.reported.set()
    return exit_status_of_signal(number)


def _os_error_line(err: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` -> ``x: No such file or directory``."""
    text = err.strerror or str(err)
    if err.filename is not None and err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {text}"
    if err.filename is not None:
        return f"{err.filename}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
