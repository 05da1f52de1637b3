"""Which ``malloc`` the process runs on, and choosing one.

glibc's malloc fragments under a training step's mix of large transient tensors and small saved ones: peak RSS
ends up far above the live tensor bytes (LoRA on the shared ViT-S/14: +65 %). tcmalloc and jemalloc do not, and
are no slower (docs/memory.md, "Allocators"). A process cannot swap its allocator once it runs, so ``edge-alast train``
re-executes itself once, before torch is imported, with the chosen library in ``LD_PRELOAD`` (PyTorch's own CPU
launcher, ``torch.backends.xeon.run_cpu --enable-tcmalloc``, uses the same mechanism). The Python API cannot
re-execute: it runs on whatever allocator its process has, and the run records which (:func:`allocator_in_use`).

Torch-free and import-light: the CLI calls it before anything heavy is loaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["ALLOCATORS", "CHOICES", "AUTO_ORDER", "allocator_in_use", "find_library", "tune_glibc",
           "reexec_with_allocator"]

ALLOCATORS = ("tcmalloc", "jemalloc", "glibc")
CHOICES = ("auto",) + ALLOCATORS
# What ``auto`` tries, in order. tcmalloc only: in one benchmark run (docs/memory.md, "Allocators") it cut peak RSS to
# 0.64-0.93x glibc's at 0.91-1.04x its step time; jemalloc saved as much memory but cost 1.12-1.24x the time.
AUTO_ORDER = ("tcmalloc",)

# Shared-object names per allocator, preferred first: Debian/Ubuntu/Raspberry Pi OS/Jetson L4T package
# libtcmalloc-minimal4 (the allocator without the profiler) and libjemalloc2; libgoogle-perftools4's full tcmalloc
# is accepted too.
SONAMES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
_LINK_NAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
# A mapped file whose name matches is that allocator (libtcmalloc_minimal_debug included).
_PATTERNS = {"tcmalloc": re.compile(r"libtcmalloc"), "jemalloc": re.compile(r"libjemalloc")}

# Set in the environment of the re-executed process: the pid that re-executed (``execve`` keeps it), so a process
# re-executes at most once, while a child it starts may still choose for itself.
REEXEC_ENV = "EDGE_ALAST_ALLOCATOR_REEXEC"


# ================================================================================================================
# Finding the libraries
# ================================================================================================================


def _library_dirs() -> list[Path]:
    """Where distributions put shared libraries for this interpreter's architecture (multiarch first: an armhf
    Python on a 64-bit Raspberry Pi kernel needs the arm-linux-gnueabihf copy, not the aarch64 one)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or {
        "x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "armv7l": "arm-linux-gnueabihf",
    }.get(os.uname().machine if hasattr(os, "uname") else "", "")
    dirs = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    dirs += ["/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/local/lib"]
    return [Path(d) for d in dirs]


def _ldconfig_paths() -> dict[str, str]:
    """soname -> path from the dynamic linker's cache (``ldconfig -p``), for this interpreter's word size."""
    ldconfig = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), "ldconfig")
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    want_64 = sys.maxsize > 2**32
    found = {}
    for line in out.splitlines():
        # "\tlibjemalloc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libjemalloc.so.2"
        m = re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and ("64" in m.group(2)) == want_64:  # "x86-64", "AArch64" vs "hard-float", plain "libc6"
            found.setdefault(m.group(1), m.group(3))
    return found


@functools.lru_cache(maxsize=None)
def find_library(allocator: str) -> str | None:
    """Path of ``allocator``'s shared library (``tcmalloc`` or ``jemalloc``), or None when it is not installed.

    Looks in the known library folders for this architecture, then in ``ldconfig -p``'s cache, then asks
    :func:`ctypes.util.find_library` (which may give a bare soname; ``LD_PRELOAD`` searches for those as the
    dynamic linker does).
    """
    if allocator not in SONAMES:
        return None
    for folder in _library_dirs():
        for soname in SONAMES[allocator]:
            if (folder / soname).is_file():
                return str(folder / soname)
    cache = _ldconfig_paths()
    for soname in SONAMES[allocator]:
        if soname in cache and Path(cache[soname]).is_file():
            return cache[soname]
    for name in _LINK_NAMES[allocator]:
        found = ctypes.util.find_library(name)
        if found and "debug" not in found:
            return found
    return None


# ================================================================================================================
# Which allocator this process uses
# ================================================================================================================


def _mapping_of(address: int, maps: str) -> str | None:
    """The file mapped at ``address`` in a /proc/PID/maps text, or None."""
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        lo, _, hi = parts[0].partition("-")
        if int(lo, 16) <= address < int(hi, 16):
            return parts[5].strip() if len(parts) > 5 else None
    return None


def _name_of(path: str | None) -> str | None:
    for name, pattern in _PATTERNS.items():
        if path and pattern.search(os.path.basename(path)):
            return name
    return None


_tuned = False  # set by tune_glibc


class _LinkMap(ctypes.Structure):
    """The public head of glibc's ``struct link_map`` (<link.h>): one loaded object, in load order."""


_LinkMap._fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p), ("l_ld", ctypes.c_void_p),
                     ("l_next", ctypes.POINTER(_LinkMap)), ("l_prev", ctypes.POINTER(_LinkMap))]
RTLD_DI_LINKMAP = 2


def _malloc_definer(maps: str) -> str | None:
    """The mapped file of the first loaded object that defines ``malloc`` itself, walking the dynamic linker's
    list from the program (the program, then ``LD_PRELOAD`` libraries, then its libraries: the order in which the
    global lookup binds), or None where that list cannot be read (not glibc)."""
    try:
        program = ctypes.CDLL(None)
        dlinfo = getattr(program, "dlinfo", None) or ctypes.CDLL("libdl.so.2").dlinfo  # glibc < 2.34: libdl
        node = ctypes.POINTER(_LinkMap)()
        if dlinfo(ctypes.c_void_p(program._handle), RTLD_DI_LINKMAP, ctypes.byref(node)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    while node:
        name = node.contents.l_name
        node = node.contents.l_next
        if not name:  # the program itself
            continue
        try:
            address = ctypes.cast(ctypes.CDLL(name.decode()).malloc, ctypes.c_void_p).value
        except (OSError, AttributeError, UnicodeDecodeError):
            continue
        owner = _mapping_of(address, maps) if address else None
        try:  # compared as files: under qemu -L the maps name the host path, l_name the guest's
            if owner and os.path.samefile(owner, name.decode()):
                return owner
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def allocator_in_use() -> str:
    """The allocator serving this process's ``malloc``: ``tcmalloc``, ``jemalloc``, ``glibc`` (``glibc-tuned``
    after :func:`tune_glibc`), or ``system`` where it cannot be told (no /proc, not glibc).

    Reads the address ``malloc`` resolves to in the global symbol scope (where an ``LD_PRELOAD`` library comes
    first) and finds the file mapped there in ``/proc/self/maps``; a library that is merely loaded (``dlopen``)
    does not count.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = None
    if maps is not None:
        try:
            address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
            owner = _mapping_of(address, maps) if address else None
        except (OSError, AttributeError, ValueError):
            owner = None
        if not (_name_of(owner) or (owner and re.search(r"/libc[.-]", owner))):
            # A non-PIE executable (Debian's and Raspberry Pi OS's /usr/bin/python3.11) that calls malloc gets a
            # canonical PLT entry, and the global lookup answers with that address inside the executable itself.
            owner = _malloc_definer(maps) or owner
        name = _name_of(owner)
        if name:
            return name
        if owner is not None and re.search(r"/libc[.-]", owner):
            return "glibc-tuned" if _tuned else "glibc"
    import platform

    return ("glibc-tuned" if _tuned else "glibc") if platform.libc_ver()[0] == "glibc" else "system"


# ================================================================================================================
# glibc tuning (mallopt)
# ================================================================================================================

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def tune_glibc(arena_max: int = 2, mmap_threshold: int = 4 << 20, trim_threshold: int = 8 << 20) -> bool:
    """Tune glibc's malloc with ``mallopt``; call at process start, before the large allocations.

    - ``M_MMAP_THRESHOLD`` 4 MiB: by default glibc raises its mmap threshold to the size of every mmapped block
      freed, up to 32 MiB, so after the first step every activation (6-25 MiB for ViT-S at batch 16) comes from
      the heap and fragments it around the small tensors that stay live. Pinned at 4 MiB, the large activations are
      mappings of their own, returned to the OS on free; smaller tensors stay in the heap (at 128 KiB even those
      would be page-faulted in anew each time: an earlier session measured +35-45 % step time with
      tools/bench_allocators.py; that figure is not kept in docs/).
    - ``M_TRIM_THRESHOLD`` 8 MiB: twice the mmap threshold, glibc's own rule while the threshold is dynamic.
    - ``M_ARENA_MAX`` 2: the data loader's threads and torch's intra-op pool would otherwise each get an arena
      (up to 8 per core), each fragmenting on its own.

    Returns False where there is no glibc ``mallopt`` (musl, macOS) or glibc refused a value.
    """
    global _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = all(libc.mallopt(param, int(value)) == 1 for param, value in (
        (M_ARENA_MAX, arena_max), (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)))
    _tuned = _tuned or ok
    allocator_in_use.cache_clear()
    return ok


# ================================================================================================================
# Re-executing with LD_PRELOAD
# ================================================================================================================


def _without_allocators(preload: str) -> list[str]:
    """``LD_PRELOAD``'s entries (space or colon separated) less any tcmalloc/jemalloc library."""
    return [p for p in re.split(r"[ :]+", preload) if p and not _name_of(p)]


def reexec_with_allocator(choice: str, argv: list[str] | None = None) -> str | None:
    """Make this process run on ``choice`` (one of :data:`CHOICES`), re-executing it once with ``LD_PRELOAD``
    when it does not already. Does not return when it re-executes (``os.execve`` keeps the pid, open files and
    signal dispositions); otherwise returns a warning to report, or None.

    ``auto`` keeps a tcmalloc or jemalloc the process already has (a user's own ``LD_PRELOAD``) and otherwise
    takes the first of :data:`AUTO_ORDER` that is installed (tcmalloc); ``glibc`` removes a tcmalloc/jemalloc from
    ``LD_PRELOAD``. A library that is missing, or that did not load, leaves the process on what it has, with a
    warning. ``argv``: the command line to re-execute (default: this interpreter's, ``sys.orig_argv``).
    """
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {', '.join(CHOICES)}, got {choice!r}")
    current = allocator_in_use()
    if choice == "auto" and current in SONAMES:  # the user's own LD_PRELOAD of one
        return None
    if choice == "auto":
        target = next((a for a in AUTO_ORDER if find_library(a)), None)
        if target is None:
            return ("tcmalloc is not installed: running on glibc, whose peak memory is up to 1.6x higher "
                    "(apt-get install libtcmalloc-minimal4; --allocator glibc silences this)")
    else:
        target = choice
    if current == target or (target == "glibc" and current in ("glibc", "glibc-tuned", "system")):
        return None
    library = find_library(target) if target != "glibc" else None
    if target != "glibc" and library is None:
        return (f"--allocator {target}: {SONAMES[target][0]} not found, running on {current} "
                f"(apt-get install {'libtcmalloc-minimal4' if target == 'tcmalloc' else 'libjemalloc2'})")
    if os.environ.get(REEXEC_ENV) == str(os.getpid()):  # already re-executed once: the preload did not take
        return f"--allocator {target}: LD_PRELOAD of {library or 'nothing'} did not take effect, running on {current}"
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", []))
    if not argv or not sys.executable:
        return f"--allocator {target}: cannot re-execute this process, running on {current}"
    preload = _without_allocators(os.environ.get("LD_PRELOAD", ""))
    env = dict(os.environ)
    env[REEXEC_ENV] = str(os.getpid())
    if library:
        preload.insert(0, library)  # first, so its malloc is the one every later library binds to
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as e:
        return f"--allocator {target}: cannot re-execute ({e}), running on {current}"
    return None  # not reached
