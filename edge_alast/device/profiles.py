"""Device profiles: load, validate and detect the memory/compute limits of the board edge-alast trains on.

A profile is data, not code: the shipped YAML files in ``device_profiles/`` (installed as
``edge_alast.device_profiles``) each cite where their figures come from, and ``load_profile`` validates one into a
frozen ``DeviceProfile``. ``"auto"`` builds a profile for the host at run time (``detect_host``).

This module never imports torch at import time; ``detect_host`` imports it lazily, only to look for a CUDA device.
"""
from __future__ import annotations

import dataclasses
import decimal
import importlib.resources
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil
import yaml

from . import host

__all__ = ["DeviceProfile", "ProfileError", "detect_host", "list_profiles", "load_profile", "parse_profile"]

PRECISIONS = ("fp32", "bf16", "fp16")
FAST_PRECISIONS = ("bf16", "fp16")
DEFAULT_PRECISIONS = PRECISIONS + ("auto",)
DEVICES = ("cuda", "cpu")
AUTO = "auto"

_REQUIRED = (
    "name",
    "description",
    "device",
    "memory_ceiling_bytes",
    "flops_per_second",
    "default_batch_size",
    "default_precision",
)
_OPTIONAL = {"fast_precisions": [], "threads": None, "flop_ceiling_per_step": None, "target_step_seconds": None,
             "host_match": [], "compile": None}
_ALIAS_FIELDS = ("name", "description", "alias_of")

# Units a memory size may be written in. Decimal and binary prefixes both appear in spec sheets, so both are
# accepted, and the unit must end in "B" (a bare "G" is ambiguous).
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
# PyYAML follows YAML 1.1, where ``1.2e12`` (no sign in the exponent) is a string, not a float; numeric strings
# like it are accepted for float fields so that the natural spelling works.
_NUMBER_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")

# --- detect_host estimates -------------------------------------------------------------------------------------
# Fraction of the host's memory a training process may plan to use: the rest is left for the OS, page cache, the
# data loader and allocator fragmentation, none of which the planner's cost model counts.
_HOST_MEMORY_FRACTION = 0.85
# Rough sustained PyTorch fp32 training rate per physical core. Peak FMA throughput is 64 FLOP/cycle per core with
# two AVX-512 units (32 with AVX2) at ~3 GHz; training kernels sustain roughly a tenth of that.
_CPU_FLOPS_PER_CORE_AVX512 = 16e9
_CPU_FLOPS_PER_CORE = 8e9
# Rough sustained fp32 rate per CUDA streaming multiprocessor: 64 FP32 lanes x 2 FLOP (FMA) x ~1 GHz. The Orin Nano
# 8GB (8 SMs) comes out at 1.0e12 against 1.2e12 measured; large datacenter GPUs are underestimated.
_CUDA_FLOPS_PER_SM = 128e9
# Half-precision rate on tensor cores relative to fp32: the low end of the 2-4x seen on Ampere, as planning margin.
_CUDA_HALF_SPEEDUP = 2.0
# Starting batch sizes for an unknown host; the planner's memory cap decides what actually fits.
_AUTO_BATCH_SIZE_CUDA = 32
_AUTO_BATCH_SIZE_CPU = 16


class ProfileError(ValueError):
    """A device profile that cannot be found, read or validated; the message names the file and the field."""


@dataclass(frozen=True)
class DeviceProfile:
    """The limits edge-alast plans a training run against. Build one with ``load_profile`` or ``parse_profile``.

    Attributes:
        name: Profile name (the file stem for shipped profiles, ``"auto"`` for a detected host).
        description: What the profile describes, including where estimates were made.
        device: ``"cuda"`` or ``"cpu"``.
        memory_ceiling_bytes: Memory the training process may use (CPU + GPU on unified-memory boards).
        flops_per_second: Sustained FLOP/s per precision (``"fp32"`` always present). Read-only by convention.
        fast_precisions: Reduced precisions the hardware runs faster than fp32 (``"bf16"``, ``"fp16"``).
        threads: Intra-op CPU threads for torch, or None to keep torch's default.
        flop_ceiling_per_step: Fixed FLOP budget per training step, or None.
        target_step_seconds: Wall-clock target per step, turned into a FLOP budget by ``flop_ceiling``; or None.
        default_batch_size: Batch size used when the run does not set one.
        default_precision: ``"fp32"``, ``"bf16"``, ``"fp16"``, or ``"auto"`` (the trainer picks for the host).
        source: Where the profile was loaded from (a file path, or ``"detect_host"``).
        host_match: Words that identify the hardware the profile describes, matched case-insensitively against
            the host's architecture and board model (:func:`match_host`; ``edge-alast doctor``).
        alias_of: For a profile loaded through an alias, the name of the profile it stands for.
        compile: Whether compiling the blocks (``--compile auto``) paid off on this hardware, as measured by
            ``tools/bench_compile.py``; None where it was not measured (``auto`` then stays eager).
    """

    name: str
    description: str
    device: str
    memory_ceiling_bytes: int
    flops_per_second: dict[str, float] = field(hash=False)  # a dict cannot be hashed; the other fields identify it
    fast_precisions: tuple[str, ...]
    threads: int | None
    flop_ceiling_per_step: float | None
    target_step_seconds: float | None
    default_batch_size: int
    default_precision: str
    source: str
    alias_of: str | None = None
    host_match: tuple[str, ...] = ()
    compile: bool | None = None

    def flop_ceiling(self, precision: str) -> float | None:
        """FLOP budget for one training step at ``precision``, or None if the profile sets no ceiling.

        ``flop_ceiling_per_step`` wins when set; otherwise ``target_step_seconds`` times the precision's FLOP/s
        (the fp32 rate when the profile lists none for that precision).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        if self.flop_ceiling_per_step is not None:
            return self.flop_ceiling_per_step
        if self.target_step_seconds is None:
            return None
        rate = self.flops_per_second.get(precision, self.flops_per_second["fp32"])
        return self.target_step_seconds * rate

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain YAML/JSON-ready values (lists and dicts), including ``source`` and ``alias_of``."""
        out = dataclasses.asdict(self)
        out["fast_precisions"] = list(self.fast_precisions)
        out["flops_per_second"] = dict(self.flops_per_second)
        out["host_match"] = list(self.host_match)
        return out


# ================================================================================================================
# Validation
# ================================================================================================================


def _fail(source: str, message: str) -> ProfileError:
    return ProfileError(f"profile {source}: {message}")


def _field_error(source: str, name: str, requirement: str, value: Any) -> ProfileError:
    return _fail(source, f"field {name!r} must be {requirement} (got {value!r})")


def _parse_size(value: Any) -> int | None:
    """Bytes from an int or a string like ``"2.1GiB"``/``"5 GB"``/``"4096"``; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _SIZE_RE.match(value)
    if match is None:
        return None
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower() if unit else "b")
    if multiplier is None:
        return None
    return int(decimal.Decimal(number) * multiplier)  # whole bytes, rounded down; exact for decimal input


def _positive_int(source: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _field_error(source, name, "a positive integer", value)
    return value


def _positive_float(source: str, name: str, value: Any) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _NUMBER_RE.match(value):
        number = float(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise _field_error(source, name, "a positive number", value)
    return number


def _bool(source: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _field_error(source, name, "true or false", value)
    return value


def _optional(source: str, name: str, value: Any, check) -> Any:
    return None if value is None else check(source, name, value)


def _choice(source: str, name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise _field_error(source, name, "one of " + ", ".join(repr(a) for a in allowed), value)
    return value


def _text(source: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _field_error(source, name, "a non-empty string", value)
    return value


def _check_keys(data: Mapping[str, Any], source: str, required: Iterable[str], known: Iterable[str]) -> None:
    known = tuple(known)
    for key in data:
        if key not in known:
            if key == "source":
                raise _fail(source, "field 'source' is filled in by the loader and must not be set in the file")
            raise _fail(source, f"field {key!r} is not a known field (known: {', '.join(known)})")
    for key in required:
        if key not in data:
            raise _fail(source, f"field {key!r} is required")


def parse_profile(data: Mapping[str, Any], source: str) -> DeviceProfile:
    """Validate the contents of a profile file into a ``DeviceProfile``.

    An alias (a mapping with ``alias_of``) resolves to the shipped profile it names, keeping its own name and
    description.

    Args:
        data: The file's top-level mapping.
        source: Where ``data`` came from; named in every error and stored on the profile.

    Raises:
        ProfileError: A missing, unknown or invalid field.
    """
    source = str(source)
    if not isinstance(data, Mapping):
        raise _fail(source, f"top level must be a mapping of fields (got {type(data).__name__})")
    if "alias_of" in data:
        return _parse_alias(data, source)
    _check_keys(data, source, _REQUIRED, _REQUIRED + tuple(_OPTIONAL))
    values = {**_OPTIONAL, **data}

    flops = values["flops_per_second"]
    if not isinstance(flops, Mapping) or not flops:
        raise _field_error(source, "flops_per_second", "a mapping of precision to FLOP/s, e.g. {fp32: 1.0e+12}", flops)
    for key in flops:
        if key not in PRECISIONS:
            raise _fail(
                source, f"field 'flops_per_second' has unknown precision {key!r} (allowed: {', '.join(PRECISIONS)})"
            )
    if "fp32" not in flops:
        raise _fail(source, "field 'flops_per_second' must have an 'fp32' entry")
    flops_per_second = {key: _positive_float(source, f"flops_per_second.{key}", flops[key]) for key in flops}

    fast = values["fast_precisions"]
    if not isinstance(fast, list):
        raise _field_error(source, "fast_precisions", "a list drawn from 'bf16', 'fp16'", fast)
    for item in fast:
        _choice(source, "fast_precisions", item, FAST_PRECISIONS)
    if len(set(fast)) != len(fast):
        raise _field_error(source, "fast_precisions", "a list without repeats", fast)

    memory = _parse_size(values["memory_ceiling_bytes"])
    if memory is None or memory <= 0:
        raise _field_error(
            source, "memory_ceiling_bytes", "a positive integer or a size like '2.1GiB'", values["memory_ceiling_bytes"]
        )

    ceiling = _optional(source, "flop_ceiling_per_step", values["flop_ceiling_per_step"], _positive_float)
    target = _optional(source, "target_step_seconds", values["target_step_seconds"], _positive_float)
    if ceiling is not None and target is not None:
        raise _fail(source, "fields 'flop_ceiling_per_step' and 'target_step_seconds' are exclusive; set one")

    host_match = values["host_match"]
    if not isinstance(host_match, list) or not all(isinstance(w, str) and w.strip() for w in host_match):
        raise _field_error(source, "host_match", "a list of words, e.g. ['aarch64', 'Raspberry Pi 5']", host_match)

    default_precision = _choice(source, "default_precision", values["default_precision"], DEFAULT_PRECISIONS)
    if default_precision in FAST_PRECISIONS and default_precision not in fast:
        raise _fail(
            source,
            f"field 'default_precision' is {default_precision!r}, which is not listed in 'fast_precisions' {fast!r}",
        )

    return DeviceProfile(
        name=_text(source, "name", values["name"]),
        description=_text(source, "description", values["description"]).strip(),
        device=_choice(source, "device", values["device"], DEVICES),
        memory_ceiling_bytes=memory,
        flops_per_second=flops_per_second,
        fast_precisions=tuple(fast),
        threads=_optional(source, "threads", values["threads"], _positive_int),
        flop_ceiling_per_step=ceiling,
        target_step_seconds=target,
        default_batch_size=_positive_int(source, "default_batch_size", values["default_batch_size"]),
        default_precision=default_precision,
        source=source,
        host_match=tuple(w.strip() for w in host_match),
        compile=_optional(source, "compile", values["compile"], _bool),
    )


def _parse_alias(data: Mapping[str, Any], source: str) -> DeviceProfile:
    extra = [key for key in data if key not in _ALIAS_FIELDS]
    if extra:
        raise _fail(
            source,
            f"field 'alias_of' makes this an alias, which may only set {', '.join(_ALIAS_FIELDS)} "
            f"(also found: {', '.join(repr(key) for key in extra)})",
        )
    _check_keys(data, source, _ALIAS_FIELDS, _ALIAS_FIELDS)
    name = _text(source, "name", data["name"])
    description = _text(source, "description", data["description"]).strip()
    shipped = _shipped_files()
    target_name = data["alias_of"]
    if not isinstance(target_name, str) or target_name not in shipped:
        requirement = "the name of a shipped profile: " + ", ".join(sorted(shipped))
        raise _field_error(source, "alias_of", requirement, target_name)
    target = _load_file(shipped[target_name], str(shipped[target_name]), allow_alias=False)
    if target is None:
        raise _field_error(source, "alias_of", "a profile that is not itself an alias", target_name)
    return dataclasses.replace(target, name=name, description=description, source=source, alias_of=target.name)


# ================================================================================================================
# Loading
# ================================================================================================================


def _profiles_root():
    """The shipped profile folder: ``device_profiles/`` of the source tree this package runs from, else the installed
    package's resources. The source tree comes first: an editable install maps ``edge_alast.device_profiles`` to the
    checkout it was installed from, which another checkout of the code (a git worktree) must not read."""
    checkout = Path(__file__).resolve().parents[2] / "device_profiles"
    if (checkout / "__init__.py").is_file():
        return checkout
    try:
        root = importlib.resources.files("edge_alast.device_profiles")
        if root.is_dir():
            return root
    except (ImportError, TypeError):
        pass  # a source checkout that is not installed: edge_alast.device_profiles does not exist as a package
    return Path(__file__).resolve().parents[2] / "device_profiles"


def _shipped_files() -> dict:
    root = _profiles_root()
    if not root.is_dir():
        return {}
    files = {}
    for entry in root.iterdir():
        stem, dot, suffix = entry.name.rpartition(".")
        if dot and suffix in ("yaml", "yml") and entry.is_file():
            files[stem] = entry
    return files


def _read_yaml(text: str, source: str) -> Any:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail(source, f"invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise _fail(source, f"top level must be a mapping of fields (got {type(data).__name__})")
    return data


def _load_file(entry, source: str, *, allow_alias: bool = True) -> DeviceProfile | None:
    """Load one file (a Path or an importlib Traversable); None for an alias when ``allow_alias`` is False."""
    try:
        text = entry.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(source, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(source, f"cannot read file: {e}") from None
    data = _read_yaml(text, source)
    if "alias_of" in data and not allow_alias:
        return None
    return parse_profile(data, source)


def list_profiles() -> list[str]:
    """Names of the shipped profiles, aliases included, sorted. ``"auto"`` is accepted too but is not a file."""
    return sorted(_shipped_files())


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """Load a shipped profile by name, ``"auto"`` (``detect_host()``), or a ``.yaml``/``.yml`` file by path.

    Raises:
        ProfileError: An unknown name (the message lists the available ones), or a file that does not validate.
    """
    is_path = isinstance(name_or_path, os.PathLike)
    text = os.fspath(name_or_path)
    if not is_path and text == AUTO:
        return detect_host()
    if is_path or text.endswith((".yaml", ".yml")) or os.sep in text or (os.altsep and os.altsep in text):
        path = Path(text).expanduser()
        return _load_file(path, str(path.resolve()))
    shipped = _shipped_files()
    if text not in shipped:
        available = ", ".join(sorted([*shipped, AUTO]))
        raise ProfileError(
            f"unknown device profile {text!r}; available: {available} (or give a path to a .yaml file)"
        )
    return _load_file(shipped[text], str(shipped[text]))


# ================================================================================================================
# Host detection
# ================================================================================================================


def detect_host(
    *,
    cpuinfo_path: str | os.PathLike = "/proc/cpuinfo",
    cgroup_memory_path: str | os.PathLike = "/sys/fs/cgroup/memory.max",
    tegra_release_path: str | os.PathLike = "/etc/nv_tegra_release",
    probe_cuda: bool = True,
) -> DeviceProfile:
    """Build the ``"auto"`` profile for this machine from what the OS reports; nothing is benchmarked.

    Memory is the system RAM, or the cgroup v2 limit when that is smaller; on a CUDA host it is the GPU's memory
    (capped by the RAM on Jetson, whose memory is shared). The ceiling is 85 % of it. FLOP/s are rough estimates
    from core or SM counts, marked as such in ``description``. No FLOP ceiling is set.

    Args:
        cpuinfo_path: Where to read CPU flags (``avx512_bf16``/``amx_bf16`` make bf16 fast on CPU).
        cgroup_memory_path: The cgroup v2 memory limit file.
        tegra_release_path: Present on NVIDIA Jetson (L4T) systems.
        probe_cuda: Look for a CUDA device (imports torch). False describes the CPU only.
    """
    ram = psutil.virtual_memory().total
    cgroup_limit = host.read_cgroup_limit(cgroup_memory_path)
    ram_limit = min(ram, cgroup_limit) if cgroup_limit is not None else ram
    memory_note = f"cgroup limit {cgroup_limit} B" if ram_limit != ram else f"system RAM {ram} B"
    threads = host.cpu_threads()
    is_jetson = Path(tegra_release_path).exists()
    cuda = host.cuda_device() if probe_cuda else None

    if cuda is not None:
        gpu_name, gpu_memory, sm_count, capability = cuda
        if is_jetson:
            memory = min(gpu_memory, ram_limit)  # unified memory: the GPU's share is the system's RAM
            memory_note = f"Jetson (found {tegra_release_path}) unified memory, {memory} B"
        else:
            memory, memory_note = gpu_memory, f"GPU memory {gpu_memory} B"
        fast = ["bf16", "fp16"] if capability >= (8, 0) else ["fp16"] if capability >= (7, 0) else []
        fp32 = sm_count * _CUDA_FLOPS_PER_SM
        flops = {"fp32": fp32, **{p: fp32 * _CUDA_HALF_SPEEDUP for p in fast}}
        device, batch_size = "cuda", _AUTO_BATCH_SIZE_CUDA
        default_precision = fast[0] if fast else "fp32"
        hardware = (
            f"CUDA device 0 {gpu_name} (compute capability {capability[0]}.{capability[1]}, {sm_count} SMs); "
            f"FLOP/s estimated as {_CUDA_FLOPS_PER_SM:.3g} per SM"
            + (f", x{_CUDA_HALF_SPEEDUP:g} for {'/'.join(fast)}" if fast else "")
        )
    else:
        memory = ram_limit
        cpu_flags = host.read_cpu_flags(cpuinfo_path)
        fast = ["bf16"] if cpu_flags & {"avx512_bf16", "amx_bf16"} else []
        per_core = _CPU_FLOPS_PER_CORE_AVX512 if "avx512f" in cpu_flags else _CPU_FLOPS_PER_CORE
        flops = {"fp32": threads * per_core}
        found = sorted(cpu_flags & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
        device, batch_size, default_precision = "cpu", _AUTO_BATCH_SIZE_CPU, "auto"
        hardware = (
            f"CPU, {threads} cores, flags {', '.join(found) or 'none of avx512f/avx512_bf16/amx'}; "
            f"FLOP/s estimated as {per_core:.3g} per core"
        )

    data = {
        "name": AUTO,
        "description": (
            f"Detected host: {hardware} (an estimate, not a measurement). "
            f"Memory ceiling {_HOST_MEMORY_FRACTION:.0%} of {memory_note}. No FLOP ceiling."
        ),
        "device": device,
        "memory_ceiling_bytes": max(1, int(memory * _HOST_MEMORY_FRACTION)),
        "flops_per_second": flops,
        "fast_precisions": fast,
        "threads": threads,
        "default_batch_size": batch_size,
        "default_precision": default_precision,
    }
    return parse_profile(data, "detect_host")


def match_host(machine: str, board: str | None, memory_bytes: int) -> DeviceProfile | None:
    """The shipped profile that describes this host: every word of its ``host_match`` found (case-insensitively)
    in ``"<machine> <board model>"``; among those, the largest memory ceiling that fits ``memory_bytes`` (the 4 GB
    and 8 GB variants of a board share their words). None when no profile matches."""
    text = f"{machine} {board or ''}".lower()
    found = []
    for name, entry in _shipped_files().items():
        profile = _load_file(entry, str(entry), allow_alias=False)
        if profile is None or not profile.host_match:
            continue
        if all(word.lower() in text for word in profile.host_match):
            found.append(profile)
    fitting = [p for p in found if p.memory_ceiling_bytes <= memory_bytes]
    pool = fitting or found
    return max(pool, key=lambda p: (len(p.host_match), p.memory_ceiling_bytes) if fitting else
               (len(p.host_match), -p.memory_ceiling_bytes), default=None)


def reference_flops(profile: DeviceProfile | None, precision: str, device: str = "cpu") -> tuple[float | None, str]:
    """The sustained FLOP/s a run's achieved rate is compared with, and where it comes from: the run's profile at
    the run's precision (its fp32 figure when the profile lists none for it), else, on the CPU, the shipped profile
    that describes this host (:func:`match_host`). ``(None, reason)`` when there is none."""
    if profile is None and device == "cpu":
        import platform

        profile = match_host(platform.machine(), host.board_model().get("model"), psutil.virtual_memory().total)
        origin = "shipped profile {} (matches this host)"
    else:
        origin = "profile {}"
    if profile is None:
        return None, "no profile: none for this device"
    rate = profile.flops_per_second.get(precision)
    label = precision
    if rate is None:
        rate, label = profile.flops_per_second["fp32"], f"fp32 (it lists no {precision})"
    return rate, f"{origin.format(profile.name)}, {label} flops_per_second"
