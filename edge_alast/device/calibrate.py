"""Measuring this host for a device profile: what ``edge-alast profiles calibrate`` runs and writes.

Every figure of the written profile is either measured here, with a ``[measured on this host, DATE]`` comment that
says how, or a ``[default]`` that says it was not measured:

- FLOP/s per precision: the forward matmuls of one ViT-S block (qkv, proj, fc1, fc2: ``torch.matmul`` on
  ``[B*N, 384] x [384, out]``) and its attention (``scaled_dot_product_attention``, 6 heads of 64, N = 257 tokens:
  ViT-S/14 at 224 px), at the profile's default batch B. FLOPs are counted with ``FlopCounterMode``, the counter
  the planner's FLOP model uses, so a rate here and a step's FLOPs there are in the same units. Each kernel is
  warmed up, then timed until its share of ``seconds`` is spent; the figure is the median sample. The profile's
  rate is the block's: its matmul and attention FLOPs over the time the two take together.
- Fast precisions: bf16 (CPU: only where torch reports oneDNN bf16 support) and, on CUDA, fp16; a precision is
  fast when its rate beats fp32's by the margin :func:`edge_alast.device.precision.cpu_bf16_is_faster` uses.
- Memory: the RAM the OS reports available (read before torch is imported), capped by the headroom of this
  process's cgroup (the probes of :mod:`edge_alast.device.host`); on CUDA the GPU's free memory (on Jetson, whose
  memory is shared, the lesser of the two). The ceiling is ``detect_host``'s share of it. The resident size of a
  fresh process that imported torch and timm and built a ViT-S is measured and reported, not subtracted: the
  planner adds the process baseline to every prediction it compares with the ceiling.

Rates of kernels alone are upper bounds for a training step, which also runs norms, activations, the optimizer
and data loading; the written description says so.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import psutil
import yaml

from . import host
from .profiles import (
    _AUTO_BATCH_SIZE_CPU,
    _AUTO_BATCH_SIZE_CUDA,
    _HOST_MEMORY_FRACTION,
    ProfileError,
    load_profile,
)
from ..atomic import atomic_write
from ..errors import ConfigError

__all__ = [
    "CalibrationError",
    "HostMeasurement",
    "KernelRates",
    "measure_host",
    "usable_memory",
    "render_profile",
    "write_profile",
]

# ViT-S/14 at 224 px (DINOv2, the project's reference model): 16 x 16 patches + the class token.
VIT_S_DIM, VIT_S_HEADS, VIT_S_TOKENS, VIT_S_MLP = 384, 6, 257, 1536
VIT_S_LINEAR_OUT = (3 * VIT_S_DIM, VIT_S_DIM, VIT_S_MLP)  # qkv, proj, fc1 (fc2 maps VIT_S_MLP back to VIT_S_DIM)
# A reduced precision is fast when it beats fp32 by this factor: the 10 % margin of cpu_bf16_is_faster.
FAST_MARGIN = 1 / 0.9
# A timed sample repeats the kernel until it lasts this long, so timer and synchronisation overheads stay small.
MIN_SAMPLE_SECONDS = 0.01
MIN_SAMPLES = 3
_TEGRA_RELEASE = "/etc/nv_tegra_release"
# What a fresh training process holds before it trains: interpreter, torch, timm and a ViT-S (random weights),
# built the way a run builds it (edge_alast.model.build also carries the timm/torchvision import fix).
_BASELINE_CODE = (
    "import psutil\n"
    "from edge_alast.model.build import create_model\n"
    "model = create_model('vit_small_patch14_dinov2', num_classes=10, img_size=224)\n"
    "print(psutil.Process().memory_info().rss)\n"
)
_CPU_FP16 = "on CPU the trainer's auto precision picks bf16 or fp32, never fp16"
# Not measured: the same starting values as the shipped profiles (laptop_cpu and the Jetson profiles).
_TARGET_STEP_SECONDS = {"cpu": 20, "cuda": 8}


class CalibrationError(RuntimeError):
    """A measurement that could not be made, or a written profile that does not load back."""


@dataclass(frozen=True)
class KernelRates:
    """Measured FLOP/s of one precision: the block's matmuls, its attention, and the two together."""

    linear: float
    attention: float
    block: float


@dataclass(frozen=True)
class HostMeasurement:
    """Everything ``measure_host`` found; ``render_profile`` turns it into a profile file."""

    date: str
    device: str
    hardware: str
    torch_version: str
    threads: int | None
    batch_size: int
    seconds: float
    rates: dict[str, KernelRates]
    fast_precisions: tuple[str, ...]
    memory_bytes: int
    memory_note: str
    baseline_rss_bytes: int
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why it was not measured
    load_average: float | None = None  # 1-minute load average right after the timing: other work skews the rates
    cpus: int = 1  # CPUs this process may run on

    @property
    def memory_ceiling_bytes(self) -> int:
        return max(1, int(self.memory_bytes * _HOST_MEMORY_FRACTION))


# ================================================================================================================
# Memory: cgroup limits and available RAM
# ================================================================================================================


def usable_memory(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                  cgroup_v2_root: str | os.PathLike | tuple = host.CGROUP_V2_ROOTS,
                  cgroup_v1_root: str | os.PathLike = host.CGROUP_V1_MEMORY) -> tuple[int, str]:
    """Bytes this process may still use, and how that was found: the RAM the OS reports available, capped by the
    headroom of this process's cgroup (limit less usage; :func:`edge_alast.device.host.cgroup_memory`)."""
    when = (f", read with this process holding {psutil.Process().memory_info().rss / 2**20:.0f} MiB incl. torch"
            if "torch" in sys.modules else ", read before torch was imported")
    info = host.memory_available(host.cgroup_memory(proc_cgroup, cgroup_v2_root, cgroup_v1_root))
    note = f"{info['available_bytes'] / 2**30:.2f} GiB of RAM available (MemAvailable{when})"
    cgroup = info["cgroup"]
    if cgroup is None:
        return info["usable_bytes"], f"{note}; no cgroup memory limit"
    limit = (f"the cgroup v{cgroup['version']} limit {cgroup['limit_bytes'] / 2**30:.2f} GiB less its usage "
             f"{(cgroup['usage_bytes'] or 0) / 2**30:.2f} GiB ({cgroup['path']})")
    if info["usable_bytes"] < info["available_bytes"]:
        return info["usable_bytes"], f"{limit}, below the {note}"
    return info["usable_bytes"], f"{note}, below {limit}"


def measure_baseline_rss(timeout: float = 600) -> int:
    """Resident bytes of a fresh Python process that imported torch and timm and built a ViT-S (random weights)."""
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this edge_alast
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _BASELINE_CODE], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CalibrationError(f"measuring the runtime baseline failed: {e}") from None
    lines = done.stdout.split()
    if done.returncode != 0 or not lines or not lines[-1].isdigit():
        raise CalibrationError(f"measuring the runtime baseline failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-500:]}")
    return int(lines[-1])


# ================================================================================================================
# FLOP/s
# ================================================================================================================


def _median_seconds(fn: Callable[[], object], budget: float, sync: Callable[[], None]) -> float:
    """Median seconds per call of ``fn``: one warm-up call, then samples of enough calls to last
    ``MIN_SAMPLE_SECONDS``, until ``budget`` seconds are spent (at least ``MIN_SAMPLES`` samples)."""
    fn()  # warm-up: kernel selection, first-touch pages, CUDA context and handles
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-9)
    calls = max(1, math.ceil(MIN_SAMPLE_SECONDS / once))
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < MIN_SAMPLES or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def _counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as the planner's FLOP model counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model.flops import register_cpu_attention_formulas

    register_cpu_attention_formulas()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _block_kernels(batch: int, dtype, device: str):
    """The forward matmuls and the attention of one ViT-S block at ``batch`` images, as two callables."""
    import torch
    import torch.nn.functional as F

    rows = batch * VIT_S_TOKENS
    make = dict(dtype=dtype, device=device)
    x = torch.randn(rows, VIT_S_DIM, **make)
    hidden = torch.randn(rows, VIT_S_MLP, **make)
    weights = [torch.randn(VIT_S_DIM, out, **make) / VIT_S_DIM**0.5 for out in VIT_S_LINEAR_OUT]
    fc2 = torch.randn(VIT_S_MLP, VIT_S_DIM, **make) / VIT_S_MLP**0.5
    head_dim = VIT_S_DIM // VIT_S_HEADS
    q, k, v = (torch.randn(batch, VIT_S_HEADS, VIT_S_TOKENS, head_dim, **make) for _ in range(3))

    def linear():
        for w in weights:
            torch.matmul(x, w)
        torch.matmul(hidden, fc2)

    def attention():
        F.scaled_dot_product_attention(q, k, v)

    return linear, attention


def measure_rates(precision: str, *, device: str, batch: int, seconds: float) -> KernelRates:
    """FLOP/s of one ViT-S block's matmuls and attention at ``precision`` (``seconds`` split between the two)."""
    import torch

    from .precision import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        linear, attention = _block_kernels(batch, dtype, device)
        flops = {"linear": _counted_flops(linear), "attention": _counted_flops(attention)}
        times = {"linear": _median_seconds(linear, seconds / 2, sync),
                 "attention": _median_seconds(attention, seconds / 2, sync)}
    return KernelRates(linear=flops["linear"] / times["linear"], attention=flops["attention"] / times["attention"],
                       block=sum(flops.values()) / sum(times.values()))


def _reduced_precisions(device: str) -> tuple[list[str], dict[str, str]]:
    """Reduced precisions worth timing on ``device``, and why the others are left out."""
    import torch

    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return ["bf16", "fp16"], {}
        return ["fp16"], {"bf16": "torch.cuda.is_bf16_supported() is False"}
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and check():
        return ["bf16"], {"fp16": _CPU_FP16}
    return [], {"bf16": "torch reports no oneDNN bf16 support on this CPU (emulated bf16 is slower than fp32)",
                "fp16": _CPU_FP16}


# ================================================================================================================
# The host
# ================================================================================================================


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _hardware(device: str) -> str:
    import torch

    name = host.board_model()["model"] or host.cpu_model() or platform.processor() or "unknown CPU"
    cpu = f"{name}, {_usable_cpus()} CPUs usable by this process, {platform.machine()}"
    if device != "cuda":
        return cpu
    props = torch.cuda.get_device_properties(0)
    return (f"CUDA device 0 {props.name} (compute capability {props.major}.{props.minor}, "
            f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB) with {cpu}")


def measure_host(*, device: str | None = None, seconds: float = 20.0, batch_size: int | None = None,
                 tegra_release: str | os.PathLike = _TEGRA_RELEASE) -> HostMeasurement:
    """Measure this host (see the module docstring). Takes about ``seconds`` plus a fresh process's start.

    Args:
        device: ``"cuda"`` or ``"cpu"``; None picks CUDA when torch sees a device.
        seconds: Time budget of the FLOP/s measurement, split evenly between precisions and kernels.
        batch_size: Images per timed call; None uses the default batch size the profile will carry.
        tegra_release: Present on NVIDIA Jetson, whose GPU shares the system's RAM.

    Raises:
        ConfigError: ``device`` is not ``"cpu"``/``"cuda"``, or ``"cuda"`` without a CUDA device.
        CalibrationError: The runtime baseline could not be measured.
    """
    memory, memory_note = usable_memory()  # before torch is imported: nearly what a fresh training process finds

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'cuda' asked for, and torch sees no CUDA device")
    batch = batch_size or (_AUTO_BATCH_SIZE_CUDA if device == "cuda" else _AUTO_BATCH_SIZE_CPU)

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info(0)
        if Path(tegra_release).exists():
            memory_note = f"Jetson unified memory: the lesser of GPU free {free / 2**30:.2f} GiB and {memory_note}"
            memory = min(memory, int(free))
        else:
            memory, memory_note = int(free), f"GPU free memory {free / 2**30:.2f} GiB (torch.cuda.mem_get_info)"

    reduced, skipped = _reduced_precisions(device)
    precisions = ["fp32", *reduced]
    rates = {p: measure_rates(p, device=device, batch=batch, seconds=seconds / len(precisions)) for p in precisions}
    fast = tuple(p for p in reduced if rates[p].block > FAST_MARGIN * rates["fp32"].block)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return HostMeasurement(
        date=datetime.date.today().isoformat(), device=device, hardware=_hardware(device),
        torch_version=torch.__version__, threads=torch.get_num_threads() if device == "cpu" else None,
        batch_size=batch, seconds=seconds, rates=rates, fast_precisions=fast, memory_bytes=memory,
        memory_note=memory_note, baseline_rss_bytes=measure_baseline_rss(), skipped=skipped, load_average=load,
        cpus=_usable_cpus(),
    )


# ================================================================================================================
# The profile file
# ================================================================================================================


def _quote(text: str) -> str:
    return yaml.safe_dump(text, width=10**6, default_style='"').strip()


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=118 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def _load_note(m: HostMeasurement) -> str:
    if m.load_average is None:
        return ""
    return f"; 1-minute load average {m.load_average:.2f} on {m.cpus} CPUs right after"


def busy(m: HostMeasurement) -> bool:
    """Whether other work ran while the rates were timed, so they read low: a load average above 1.5x the CPUs
    (the timing itself keeps one thread per CPU busy)."""
    return m.load_average is not None and m.load_average > 1.5 * m.cpus


def render_profile(m: HostMeasurement, name: str) -> str:
    """The profile file for ``m``: the shipped profiles' fields, each figure followed by where it comes from."""
    tag = f"[measured on this host, {m.date}]"
    base = m.rates["fp32"].block
    per_kernel = m.seconds / len(m.rates) / 2
    lines = [
        *_comment(f"Written by `edge-alast profiles calibrate` on {m.date}: {m.hardware}; torch {m.torch_version}."),
        "# Sources:",
        f"#   {tag} timed or read here by edge_alast.device.calibrate (each figure says how).",
        "#   [default] not measured: the starting value the shipped profiles use.",
        f"name: {_quote(name)}",
        "description: >-",
        *textwrap.wrap(
            f"Measured on this host ({m.hardware}) on {m.date}. FLOP/s are those of one ViT-S block's forward matmuls "
            "and attention at the default batch: an upper bound for a training step, which also runs norms, "
            "activations, the optimizer and data loading.", width=116, initial_indent="  ", subsequent_indent="  "),
        f"device: {m.device}",
        *_comment(f"{tag} {_HOST_MEMORY_FRACTION:.0%} (detect_host's margin for what the cost model does not count) "
                  f"of {m.memory_note}. A fresh process with torch, timm and a ViT-S held "
                  f"{m.baseline_rss_bytes / 2**20:.0f} MiB resident: the planner counts that as its baseline inside "
                  "this ceiling, so it is not subtracted here."),
        f"memory_ceiling_bytes: {m.memory_ceiling_bytes}  # {tag} "
        f"{m.memory_ceiling_bytes / 2**30:.2f} GiB, see above",
        *_comment(f"{tag} one ViT-S block forward (4 matmuls, attention) at batch {m.batch_size} x {VIT_S_TOKENS} "
                  f"tokens; FLOPs counted by FlopCounterMode over the median time of samples taken for "
                  f"{per_kernel:.3g} s per kernel after a warm-up{_load_note(m)}."),
        "flops_per_second:",
    ]
    for precision, r in m.rates.items():
        how = f"matmuls {r.linear:.3e}, attention {r.attention:.3e}"
        if precision != "fp32":
            how += f"; {r.block / base:.2f}x fp32"
        lines.append(f"  {precision}: {r.block:.3e}  # {tag} {how}")
    for precision, why in m.skipped.items():
        lines += _comment(f"{precision} not timed: {why}", indent="  ")
    fast = "[" + ", ".join(m.fast_precisions) + "]"
    lines += [
        f"fast_precisions: {fast}  # {tag} the precisions over {FAST_MARGIN:.2f}x the fp32 rate above",
        (f"threads: {m.threads}  # {tag} torch's intra-op threads while the FLOP/s were timed" if m.threads
         else "threads: null  # [default] the GPU does the work; torch's default CPU threads"),
        f"target_step_seconds: {_TARGET_STEP_SECONDS[m.device]}  # [default] the planner's per-step FLOP budget is "
        "this x the FLOP/s",
        f"default_batch_size: {m.batch_size}  # [default] a starting point; the FLOP/s above were timed at it",
        "default_precision: auto  # [default] the trainer picks for the host (bf16 where supported and fast)",
    ]
    return "\n".join(lines) + "\n"


def write_profile(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, then load it back: a file that does not validate is removed.

    Raises:
        CalibrationError: The written file is not a valid profile (a bug in ``render_profile``).
    """
    path = Path(path)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    try:
        load_profile(path)
    except ProfileError as e:
        path.unlink(missing_ok=True)
        raise CalibrationError(f"the calibrated profile does not validate, so it was not kept: {e}") from None


def check_writable(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written as a profile file, or None if it can (checked before minutes of timing)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        return f"{path} must end in .yaml or .yml (profiles are loaded by that suffix)"
    if path.is_dir():
        return f"{path} is a folder"
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def summarise(m: HostMeasurement) -> Sequence[str]:
    """Lines for the terminal: the rates and the memory ceiling."""
    rows = [f"{p:<5} block {r.block:.3e}  matmuls {r.linear:.3e}  attention {r.attention:.3e} FLOP/s"
            for p, r in m.rates.items()]
    rows.append(f"fast precisions: {', '.join(m.fast_precisions) or 'none'}")
    rows.append(f"memory ceiling: {m.memory_ceiling_bytes / 2**30:.2f} GiB ({m.memory_note}); "
                f"runtime baseline {m.baseline_rss_bytes / 2**20:.0f} MiB")
    if busy(m):
        rows.append(f"warning: the 1-minute load average was {m.load_average:.2f} on {m.cpus} CPUs: other work ran "
                    "while timing, so the FLOP/s read low; rerun on an idle host")
    return rows
