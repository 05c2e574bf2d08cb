"""Entry point of the ``snapimg`` command.

Each command group lives in its own module under :mod:`snapimg.cli` and exposes
``register(subparsers)``, which adds its sub-commands with ``set_defaults(func=...)``.
A command function takes the parsed ``argparse.Namespace`` and returns an exit status.
User mistakes and refused operations raise :class:`SnapimgError`: printed as one line,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from snapimg import __version__
from snapimg.errors import SnapimgError

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; keep it to one line and exit 2.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapimg", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"snapimg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SnapimgError as err:
        print(f"snapimg {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"snapimg {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
