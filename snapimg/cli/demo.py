"""``snapimg demo``: the main job on the embedded default (see :mod:`snapimg.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="snapshot a sample image while qemu-io writes to it, back it up, verify"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to put the temporary files (default: the system temp dir)",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from snapimg.demo import run_demo

    return 0 if run_demo(args.workdir) else 1
