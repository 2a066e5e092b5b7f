"""Keep the server's resident memory flat under sustained traffic.

glibc raises its mmap threshold each time a large block is freed, after which large tensors come from
the heap and freed ones stay resident (fragmentation): resident memory creeps up with traffic. Fixing
the thresholds stops the creep: tensors above ``MMAP_THRESHOLD_BYTES`` go to mmap, which returns them to
the system when freed, and free memory at the top of a heap beyond ``TRIM_THRESHOLD_BYTES`` is released
(free blocks below a live one stay, as with any threshold: flatness is measured, in ``test_engine_serving``).

Both are large on purpose. Memory that is mapped again on every allocation is paid for in page faults:
with a 128 KiB mmap threshold (and glibc's 128 KiB trim threshold) each prefill's activations were
faulted in anew, and on the AMD EPYC (2 cores, bfloat16 SmolLM2, the engine in process) a step of 15
prompts of 32 tokens and one decode took 744-933 ms against 391-395 ms without it, a decode step of 16
42.4 against 36.5 ms; served, prefill steps ran at about half speed. With 32 MiB / 64 MiB: 435-517 ms
and 38.1 ms in the same comparison, and resident memory still flat (``test_engine_serving``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def bound_native_memory() -> bool:
    """Fix glibc's mmap and trim thresholds; False where the C library is not glibc (then nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
