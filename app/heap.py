"""Handing freed heap memory back to the system (no torch: the HTTP front ends use it too)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _load_malloc_trim()


def trim_memory() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``); False where there is none.

    Without it the many tile-sized blocks a large job frees stay in the process's heap (resident) until
    the allocator happens to reuse them.
    """
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))
