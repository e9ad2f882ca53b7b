"""Keeping a big model's host temporaries from staying in the process after they are freed.

glibc serves a block from its heap once a freed mapped block of that size has been
seen (its mmap threshold rises to up to 32 MB), and a heap seldom shrinks. Loading a
model frees a few MB of temporaries per tensor between the weights it keeps, so the
heap fills with holes: about 20 % of a model's size, measured. A fixed threshold keeps
every block of 1 MB or more mapped, so it goes back to the system when it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
THRESHOLD_BYTES = 1 << 20


@functools.cache
def map_large_blocks() -> bool:
    """Fixes glibc's mmap threshold at 1 MB (once per process); False where there is no
    glibc (macOS, musl), where nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
