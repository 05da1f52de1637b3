"""What this host is: probes of the CPU, memory limits, CUDA device, Jetson board and installed runtimes.

Each probe reads one thing and returns plain data (None when it cannot be read); the ``auto`` profile
(:func:`edge_alast.device.profiles.detect_host`) and ``edge-alast doctor`` build on them. torch and onnxruntime are
imported only inside the probes that need them, and a failing import is returned as data, never raised.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import psutil

CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_V2_ROOTS = (CGROUP_V2_ROOT, CGROUP_V2_ROOT / "unified")  # a v2 host; a hybrid (v1 + v2) host
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
# cgroup v1 reports "no limit" as a huge page-rounded number (LONG_MAX rounded down): anything above this is none.
_V1_NO_LIMIT = 1 << 60


def read_cpu_flags(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """CPU feature flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); empty if the file is unreadable."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_model(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The CPU's model name (x86 ``model name``; Arm boards often report none here)."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("model name", "cpu model", "hardware"):
            return value.strip()
    return None


def read_cgroup_limit(path: str | os.PathLike) -> int | None:
    """A cgroup memory limit file in bytes (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), or None when it
    is ``max``, unlimited, absent or unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value < _V1_NO_LIMIT else None


def _own_cgroup_paths(proc_cgroup: str | os.PathLike) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's memory controller, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def cgroup_memory(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                  v2_root: str | os.PathLike | tuple = CGROUP_V2_ROOTS,
                  v1_root: str | os.PathLike = CGROUP_V1_MEMORY) -> dict | None:
    """The memory limit that binds this process: its own cgroup's or any ancestor's (a limit set on a parent
    slice holds every group below it), v2 or v1, or None when no limit applies. Of several limits, the one with
    the least headroom (limit − usage) binds.

    Args:
        v2_root: Where the v2 hierarchy is mounted, or several places to look (``/sys/fs/cgroup`` on a v2 host,
            ``/sys/fs/cgroup/unified`` on a hybrid one).

    Returns:
        ``{"version": 2|1, "limit_bytes", "usage_bytes", "path"}``; usage None where unreadable.
    """
    v2, v1 = _own_cgroup_paths(proc_cgroup)
    roots = v2_root if isinstance(v2_root, tuple) else (v2_root,)
    hierarchies = []
    if v2 is not None:
        hierarchies += [(2, Path(root), v2, "memory.max", "memory.current") for root in roots]
    if v1 is not None:
        hierarchies.append((1, Path(v1_root), v1, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    found = []
    for version, root, own, limit_file, usage_file in hierarchies:
        folder = root / own.strip("/")
        for group in (folder, *folder.parents):  # the own group, then every ancestor up to the root
            if group != root and root not in group.parents:
                break
            limit = read_cgroup_limit(group / limit_file)
            if limit is None:
                continue
            try:
                usage = int((group / usage_file).read_text().strip())
            except (OSError, ValueError):
                usage = None
            found.append({"version": version, "limit_bytes": limit, "usage_bytes": usage, "path": str(group)})
    return min(found, key=lambda c: c["limit_bytes"] - (c["usage_bytes"] or 0), default=None)


def memory_available(cgroup: dict | None = None) -> dict:
    """RAM of the machine, what is available now, and what this process may still use: the smaller of available
    RAM and the cgroup's limit minus its usage."""
    vm = psutil.virtual_memory()
    info = {"total_bytes": int(vm.total), "available_bytes": int(vm.available), "cgroup": cgroup}
    usable = int(vm.available)
    if cgroup is not None:
        left = cgroup["limit_bytes"] - (cgroup["usage_bytes"] or 0)
        usable = min(usable, max(0, left))
    info["usable_bytes"] = usable
    return info


def cpu_threads() -> int:
    """CPUs this process may run on, reduced to physical cores when psutil knows them (SMT siblings add little)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False)
    return max(1, min(logical, physical) if physical else logical)


def cpu_wait_seconds(task_dir: str | os.PathLike = "/proc/self/task") -> float | None:
    """Seconds this process's threads have spent ready to run while the CPU ran something else: the run-queue wait,
    the second field of each thread's ``schedstat``. Another process on a training run's cores shows up here and
    nowhere else (the step only looks slower), so a benchmark can tell a contended run from a slow one.

    Summed over the live threads (one that exited takes its wait with it). None where the kernel keeps no
    schedstat (not Linux, or a kernel without ``CONFIG_SCHED_INFO``)."""
    try:
        threads = os.listdir(task_dir)
    except OSError:
        return None
    total, read = 0, False
    for tid in threads:
        try:
            with open(os.path.join(task_dir, tid, "schedstat"), "rb") as f:
                total += int(f.read().split()[1])
            read = True
        except (OSError, ValueError, IndexError):  # the thread exited between listdir and open
            continue
    return total / 1e9 if read else None


def cuda_device() -> tuple[str, int, int, tuple[int, int]] | None:
    """(name, total memory, SM count, compute capability) of CUDA device 0, or None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory), int(props.multi_processor_count), (props.major, props.minor)


def board_model(device_tree: str | os.PathLike = "/proc/device-tree/model",
                tegra_release: str | os.PathLike = "/etc/nv_tegra_release") -> dict:
    """The board's model string (Raspberry Pi and Jetson publish one in the device tree) and the Jetson L4T
    release line, where present."""
    info = {"model": None, "l4t": None}
    try:
        info["model"] = Path(device_tree).read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        pass
    try:
        info["l4t"] = Path(tegra_release).read_text().splitlines()[0].strip("# ").strip() or None
    except (OSError, IndexError):
        pass
    return info


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution (pip name), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_build() -> dict:
    """torch's version and build (CUDA version or CPU-only), or the import error as text."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. a missing libcudart) is what doctor reports
        return {"version": distribution_version("torch"), "error": f"{type(e).__name__}: {e}"}
    info = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "threads": torch.get_num_threads()}
    if info["cuda_available"]:
        name, memory, sms, capability = cuda_device()
        info["device"] = {"name": name, "memory_bytes": memory, "sm_count": sms,
                          "capability": f"{capability[0]}.{capability[1]}"}
    return info


def onnxruntime_build() -> dict:
    """onnxruntime's version, which distribution provides it, its execution providers, and whether the training
    API (``onnxruntime.training``, the x86_64 ``onnxruntime-training-cpu`` build) is there."""
    dists = {name: distribution_version(name) for name in
             ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training", "onnxruntime-training-cpu")}
    info = {"distributions": {k: v for k, v in dists.items() if v}}
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    info["version"] = ort.__version__
    info["providers"] = list(ort.get_available_providers())
    try:
        import onnxruntime.training.api  # noqa: F401

        info["training"] = True
    except Exception:  # noqa: BLE001 - absent from the plain build
        info["training"] = False
    return info


def platform_summary() -> dict:
    return {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
            "python": platform.python_version(), "executable": sys.executable}
