"""The command line's conventions: help, global options, option names, plurals."""

import argparse
import subprocess
import sys

import pytest

from snapimg import __version__
from snapimg.cli.main import DESCRIPTION, _leaf_parsers, build_parser
from snapimg.units import SIZE_SYNTAX, count


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def leaves() -> list[argparse.ArgumentParser]:
    return list(_leaf_parsers(build_parser()))


def test_unknown_command_is_one_line_and_exit_2() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "invalid choice: 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    proc = run(flag)
    assert proc.returncode == 0
    assert proc.stdout == f"snapimg {__version__}\n"


def test_top_help_is_a_sentence_about_the_tool() -> None:
    out = run("--help").stdout
    assert "Entry point" not in out and "``" not in out
    text = " ".join(out.split())
    assert DESCRIPTION in text
    assert " ".join(SIZE_SYNTAX.split()) in text  # described once, here
    for flag in ("-q, --quiet", "-v, --verbose", "-V, --version"):
        assert flag in out


def test_every_command_has_help_and_the_common_options() -> None:
    names = []
    for p in leaves():
        names.append(p.prog)
        out = p.format_help()
        assert "-q, --quiet" in out and "-v, --verbose" in out, p.prog
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{p.prog}: {action.dest} has no help"
            if action.option_strings == ["--control"]:
                assert action.metavar == "PATH", p.prog
            if action.metavar == "SIZE":
                assert "(SIZE, e.g. " in action.help or "(SIZE, default " in action.help, (
                    f"{p.prog} {action.option_strings}: {action.help}"
                )
            if (
                action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings
                and not isinstance(action, argparse._CountAction)
            ):
                assert "default" in action.help, f"{p.prog} {action.option_strings}"
    for expected in (
        "snapimg serve",
        "snapimg snapshot create",
        "snapimg snapshot release",
        "snapimg inspect",
        "snapimg checksum",
        "snapimg backup",
        "snapimg attach",
    ):
        assert expected in names
    for p in leaves():
        assert run(*p.prog.split()[1:], "--help").returncode == 0


def test_quiet_and_verbose_before_or_after_the_command(tmp_path: object) -> None:
    for args in (
        ["-q", "snapshot", "list", "--control", "/nonexistent/c"],
        ["snapshot", "list", "-q", "--control", "/nonexistent/c"],
        ["-vv", "snapshot", "list", "--control", "/nonexistent/c"],
        ["snapshot", "list", "--verbose", "--control", "/nonexistent/c"],
    ):
        proc = run(*args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == "snapimg snapshot: no snapimg server is running at /nonexistent/c\n"


def test_count_plurals() -> None:
    assert count(0, "block") == "0 blocks"
    assert count(1, "block") == "1 block"
    assert count(2, "range") == "2 ranges"
    assert count(1, "changed byte") == "1 changed byte"
