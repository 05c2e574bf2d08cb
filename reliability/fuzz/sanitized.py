"""The C extension as the fuzz harness runs it: built with AddressSanitizer,
UndefinedBehaviorSanitizer and libFuzzer's coverage instrumentation
(``SNAPIMG_SANITIZE=fuzzer``, clang-14) into a scratch copy of the package, which a
fuzzing process imports instead of the repository's (as scripts/sanitize.sh does for
the test suite).

:func:`build` copies ``snapimg/`` and the sources of the extension (optionally with a
planted fault: ``plant``, a test's mutant) and builds there; :func:`environment` is what
a fuzzing process needs to import that copy with atheris' ASan+libFuzzer runtime
preloaded; :func:`instrumentation` checks the built file for the sanitizers' hooks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from reliability.fuzz import session

ROOT = Path(__file__).resolve().parents[2]
CC = "clang-14"  # gcc has no -fsanitize=fuzzer-no-link
# undefined in the built file, resolved by the preloaded runtime: one hook per sanitizer
HOOKS = {
    "AddressSanitizer": "__asan_report_",
    "UndefinedBehaviorSanitizer": "__ubsan_handle_",
    "libFuzzer coverage": "__sanitizer_cov_8bit_counters_init",
}


class BuildError(RuntimeError):
    """The sanitized extension could not be built here."""


def build(into: Path, plant: tuple[tuple[str, str, str], ...] = ()) -> Path:
    """Build into ``into`` (created; returned): ``into/snapimg`` is the package with the
    instrumented extension.  ``plant``: (C file name, text, replacement), each text
    replaced in a copy of csrc/datapath, where it must occur once (a test's deliberate
    fault)."""
    if shutil.which(CC) is None:
        raise BuildError(f"{CC} is missing (scripts/install.sh installs clang-14)")
    src = into / "src"
    shutil.copytree(ROOT / "csrc", src / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name, text, replacement in plant:
        path = src / "csrc" / "datapath" / name
        code = path.read_text()
        if code.count(text) != 1:
            raise BuildError(f"cannot plant the fault: {name} has {text!r} "
                             f"{code.count(text)} times")  # fmt: skip
        path.write_text(code.replace(text, replacement))
    shutil.copytree(ROOT / "snapimg", into / "snapimg",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))  # fmt: skip
    env = {**os.environ, "SNAPIMG_SANITIZE": "fuzzer", "CC": CC}
    env.pop("LDSHARED", None)  # setuptools derives the linker from CC
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(into),
           "--build-temp", str(into / "tmp")]  # fmt: skip
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"building the sanitized extension failed: {done.stderr[-2000:]}")
    if missing := instrumentation(into):
        raise BuildError(f"the built extension lacks {', '.join(missing)}")
    return into


def extension(into: Path) -> Path:
    found = sorted((into / "snapimg").glob("_datapath*.so"))
    if not found:
        raise BuildError(f"no snapimg/_datapath*.so in {into}")
    return found[0]


def instrumentation(into: Path) -> list[str]:
    """The sanitizers whose hooks the built extension does not call (none: all live)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(extension(into))],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [name for name, hook in HOOKS.items() if hook not in out]


def environment(into: Path) -> dict[str, str]:
    """For a fuzzing process (and the processes libFuzzer starts for -merge): the copy
    in ``into`` ahead of the repository (safe path: no current directory on sys.path),
    reliability from the repository, the sanitizers' runtime preloaded."""
    return {**session.sanitizer_env(), "PYTHONSAFEPATH": "1",
            "PYTHONPATH": os.pathsep.join([str(into), str(ROOT)])}  # fmt: skip
