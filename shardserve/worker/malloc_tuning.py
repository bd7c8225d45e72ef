"""Keep freed activation buffers in the process heap (glibc mallopt) so CPU steps do not re-fault them.

By default glibc serves blocks above a dynamic threshold with mmap and gives them back to the kernel on free,
so every step's large activations ([2048, 3072] float32 is 25 MB) are faulted in page by page again: 450K
minor faults and ~0.5 s of a 3 s prefill step of SmolLM2 on 2 cores. Raising the mmap threshold to glibc's
maximum (32 MiB) and the trim threshold to 1 GiB keeps them in the heap. Skipped when the user set malloc
tunables through GLIBC_TUNABLES, or when the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20          # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the two mallopt settings to this process; True when they took effect."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))
