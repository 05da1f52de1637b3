"""Process memory readings (psutil, /proc) and returning freed heap to the OS."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import psutil

_PROCESS = psutil.Process()
_libc = None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return int(_PROCESS.memory_info().rss)


def peak_rss_bytes() -> int:
    """Highest resident set size this process has reached (kernel high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def trim_heap() -> bool:
    """Give freed glibc heap pages back to the OS (``malloc_trim(0)``).

    ALaST changes activation shapes every step; glibc keeps the freed, fragmented chunks, so the process's RSS
    creeps above what its tensors need. Trimming after each step keeps RSS near the live tensor bytes.
    Returns False where there is no glibc (musl, macOS, Windows).
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
