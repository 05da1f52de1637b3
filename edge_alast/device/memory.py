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


def _release_call():
    """The call that hands freed heap pages back to the OS, for the allocator this process runs on (an allocator
    preloaded with ``LD_PRELOAD`` comes first in the process's symbols), or None."""
    try:
        proc = ctypes.CDLL(None)
    except OSError:
        return None
    if hasattr(proc, "MallocExtension_ReleaseFreeMemory"):  # tcmalloc (gperftools): it keeps freed spans otherwise
        return proc.MallocExtension_ReleaseFreeMemory
    if hasattr(proc, "mallctl"):  # jemalloc: purge every arena's unused dirty pages (MALLCTL_ARENAS_ALL = 4096)
        return lambda: proc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    if hasattr(proc, "malloc_trim"):  # glibc
        return lambda: proc.malloc_trim(0)
    return None


def trim_heap() -> bool:
    """Give freed heap pages back to the OS: ``malloc_trim(0)`` on glibc, ``ReleaseFreeMemory`` on tcmalloc, an
    arena purge on jemalloc.

    ALaST changes activation shapes every step; an allocator keeps the freed, fragmented chunks, so the process's RSS
    creeps above what its tensors need (tcmalloc keeps freed memory altogether). Trimming after each step keeps RSS
    near the live tensor bytes, and before the export lets it start from there. Returns False where no allocator
    offers the call (musl, macOS, Windows).
    """
    global _libc
    if _libc is None:
        _libc = _release_call() or False
    if not _libc:
        return False
    _libc()
    return True


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _vm_hwm_bytes() -> int | None:
    """The kernel's resident high-water mark (VmHWM) since the last reset, or None where /proc has none."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakTracker:
    """Peak RSS per interval (a training step) and over the whole process.

    Linux resets the resident high-water mark when ``5`` is written to ``/proc/self/clear_refs``; that also resets
    ``getrusage``'s ``ru_maxrss``, so the tracker folds every interval's peak into its own lifetime peak. Where the
    reset is not possible (no /proc, macOS, a kernel before 4.0) an interval's peak is the lifetime peak.
    """

    def __init__(self):
        self._lifetime = peak_rss_bytes()
        self._resettable = _vm_hwm_bytes() is not None

    def interval_peak(self, reset: bool = True) -> int:
        """The peak RSS since the last reset (the process's start for the first call); then reset it."""
        hwm = _vm_hwm_bytes() if self._resettable else None
        if hwm is None:
            self._lifetime = max(self._lifetime, peak_rss_bytes())
            return self._lifetime
        self._lifetime = max(self._lifetime, hwm)
        if reset:
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
            except OSError:
                self._resettable = False
        return hwm

    def lifetime_peak(self) -> int:
        """The highest RSS of the process so far (every interval, and the one in progress)."""
        current = _vm_hwm_bytes() if self._resettable else peak_rss_bytes()
        return max(self._lifetime, current or 0)


def cap_cuda_memory(ceiling_bytes: int, device: int = 0, unified: bool = True) -> int:
    """Cap the CUDA caching allocator at a profile's memory ceiling; an allocation beyond it raises
    ``torch.OutOfMemoryError`` in this process instead of pushing the board into the kernel's OOM killer.

    On a Jetson (``unified``) the CPU and the GPU share one memory, so the ceiling covers both: the cap is the
    ceiling minus the process's RSS now (torch, timm and the host-side runtime are loaded by then). On a discrete
    GPU the ceiling is the GPU memory the run may use. Returns the cap in bytes.
    """
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    cap = max(0, int(ceiling_bytes) - (rss_bytes() if unified else 0))
    torch.cuda.set_per_process_memory_fraction(max(1e-3, min(1.0, cap / total)), device)
    return cap
