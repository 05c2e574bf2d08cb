"""glibc malloc settings for ``snapimg serve``, a long-running server of many threads.

glibc serves blocks of at least its mmap threshold (initially 128 KiB) with mmap, and
raises the threshold to the size of every such block that is freed (up to 32 MiB).  In
serve, the first connection that ends after moving large requests (a backup reading
4 MiB pieces) frees its worker buffers and so lifts the threshold to 4 MiB; from then
on every buffer up to that size comes from glibc's per-thread arenas, and what ending
connections free there mostly stays resident.  bench/soak.py measured the resident size
wandering between 110 and 195 MiB under a steady load (peaks 1.2-1.5 times the level of
the first minute, and 120-150 MiB when idle again); with the threshold pinned it stayed
at 45-60 MiB and went back to about 32 MiB once the clients left.

Setting M_MMAP_THRESHOLD explicitly turns glibc's adjustment off (mallopt(3)).  The
compiled data path keeps its buffers for a connection's life, so a buffer is mapped once
per connection, not once per request.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's initial value


def pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB for the whole process (unless the user
    chose one with MALLOC_MMAP_THRESHOLD_); True when set.  Elsewhere than glibc: no-op."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
