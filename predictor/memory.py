"""Keep the server's resident memory flat under sustained traffic.

glibc raises its mmap threshold each time a large block is freed, after which large tensors come from
the heap and freed ones stay resident (fragmentation): resident memory creeps up with traffic. Fixing
the threshold sends every large tensor to mmap, which returns it to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def bound_native_memory() -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (then nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
