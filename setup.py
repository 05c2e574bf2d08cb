"""Builds snapimg's C extension (the compiled data path); the rest is in pyproject.toml."""

import os

from setuptools import Extension, setup

SOURCES = ["table.c", "slots.c", "record.c", "barrier.c", "core.c", "device.c", "conn.c",
           "module.c"]
# SNAPIMG_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
# (scripts/sanitize.sh); SNAPIMG_SANITIZE=fuzzer adds libFuzzer's coverage
# instrumentation (fuzzer-no-link: clang only, CC=clang-14) for the fuzz harness, which
# preloads atheris' runtime (reliability/fuzz/sanitized.py).  -fno-wrapv undoes Python's
# -fwrapv, under which UBSan does not check signed overflow.  The normal build is
# optimised.
SANITIZERS = {"1": "address,undefined", "fuzzer": "address,undefined,fuzzer-no-link"}
mode = os.environ.get("SNAPIMG_SANITIZE", "0").strip()
mode = "" if mode == "0" else mode
if mode and mode not in SANITIZERS:
    raise SystemExit(f"SNAPIMG_SANITIZE={mode!r}: expected one of {sorted(SANITIZERS)}")
sanitize = [f"-fsanitize={SANITIZERS[mode]}"] if mode else []
flags = ["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv", *sanitize] if mode else ["-O2"]

setup(
    ext_modules=[
        Extension(
            "snapimg._datapath",
            sources=[f"csrc/datapath/{name}" for name in SOURCES],
            depends=["csrc/datapath/datapath.h"],
            extra_compile_args=flags,
            extra_link_args=sanitize,
        )
    ]
)
