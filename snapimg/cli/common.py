"""Conventions every snapimg command shares, so that options read the same everywhere.

- ``--control PATH``: the control socket of ``snapimg serve`` (:func:`add_control`);
- sizes: metavar ``SIZE``, syntax described once in ``snapimg --help``
  (:data:`snapimg.units.SIZE_SYNTAX`), an example and the default in every size option
  (:func:`add_size`);
- ``--json``: the result as JSON on stdout instead of text (:func:`add_json`);
- ``-q/--quiet`` (only errors) and ``-v/--verbose`` (more log lines; twice: debug),
  accepted before or after the command name (:func:`add_verbosity`);
- results go to stdout, notices and warnings to stderr as ``snapimg CMD: ...`` lines,
  silenced by ``-q`` (:func:`notice`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SIZE_METAVAR = "SIZE"


def add_control(
    p: argparse.ArgumentParser,
    *,
    required: bool = True,
    help: str = "control socket of the running snapimg serve",
) -> None:
    p.add_argument("--control", type=_path, required=required, metavar="PATH", help=help)


def add_size(
    p: argparse.ArgumentParser,
    flag: str,
    what: str,
    *,
    example: str,
    default: str | None = None,
    required: bool = False,
) -> None:
    """A SIZE option: help reads ``WHAT (SIZE, e.g. 1G; default 64K)``."""
    shown = f"default {default}" if default is not None else f"e.g. {example}"
    if default is not None and example != default:
        shown = f"e.g. {example}; default {default}"
    p.add_argument(
        flag,
        metavar=SIZE_METAVAR,
        default=default,
        required=required,
        help=f"{what} ({SIZE_METAVAR}, {shown})",
    )


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_verbosity(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-q/-v on the top parser (defaults) and on every command (not overriding the top)."""
    default: object = 0 if top else argparse.SUPPRESS
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print nothing but errors",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="print more (log lines; twice: debug)",
    )


def notice(args: argparse.Namespace, text: str) -> None:
    """A notice or warning line on stderr (``snapimg CMD: text``), unless ``-q``."""
    if not getattr(args, "quiet", False):
        print(f"snapimg {args.command}: {text}", file=sys.stderr, flush=True)


def result(args: argparse.Namespace, text: str) -> None:
    """A result line on stdout, unless ``-q``."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)
