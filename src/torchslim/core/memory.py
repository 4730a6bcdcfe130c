"""Giving freed memory back to the system: after a model's float weights are replaced by much smaller ones (loading a
quantized file builds the float architecture first; quantizing in place drops the float layers), the C allocator
keeps the freed pages for reuse and the process still looks as large as before. ``release_freed_memory`` asks glibc
to return them (``malloc_trim``); elsewhere it does nothing.

Example:
    >>> release_freed_memory() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return freed heap pages to the system where the C library can (glibc); True when it released any."""
    library = _libc()
    return bool(library.malloc_trim(0)) if library is not None else False


__all__ = ["release_freed_memory"]
