"""Builds snapimg's C extension (the compiled data path); the rest is in pyproject.toml."""

import os

from setuptools import Extension, setup

SOURCES = ["table.c", "slots.c", "record.c", "barrier.c", "core.c", "device.c", "conn.c",
           "module.c"]
# SNAPIMG_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
# (scripts/sanitize.sh); the normal build is optimised.
sanitize = os.environ.get("SNAPIMG_SANITIZE") == "1"
flags = ["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"] if sanitize \
    else ["-O2"]

setup(
    ext_modules=[
        Extension(
            "snapimg._datapath",
            sources=[f"csrc/datapath/{name}" for name in SOURCES],
            depends=["csrc/datapath/datapath.h"],
            extra_compile_args=flags,
            extra_link_args=["-fsanitize=address,undefined"] if sanitize else [],
        )
    ]
)
