"""Numeric precision of a run: resolving ``auto`` for the device at hand, and the autocast context for it."""
from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch

from .host import read_cpu_flags

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type=device, dtype=dtype) if dtype is not None else nullcontext()


def resolve_precision(requested: str, device: str, fast: tuple[str, ...] = ()) -> str:
    """``auto``: on CUDA, bf16 where supported (compute capability >= 8), else fp16 where the profile lists it as
    fast, else fp32. On a CPU with bf16 instructions (avx512_bf16/AMX), bf16 only if it measures faster than fp32
    (:func:`cpu_bf16_is_faster`): with avx512_bf16 but no AMX, torch 2.13's bf16 matmul ran at 0.6x the fp32 rate
    on this project's CI CPU, so the flag alone is not enough."""
    if requested != "auto":
        return requested
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if "fp16" in fast else "fp32"
    if ("bf16" in fast or read_cpu_flags() & {"avx512_bf16", "amx_bf16"}) and cpu_bf16_is_faster():
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(size: tuple[int, int, int] = (1024, 1536, 384), repeats: int = 5) -> bool:
    """Time a ViT-S-sized matmul (MLP fc2 at ~1k tokens) in bf16 and fp32 on this CPU; about 0.1 s, once."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size[0], size[1], dtype=dtype)
        b = torch.randn(size[1], size[2], dtype=dtype)
        a @ b  # warm-up: kernel selection, first-touch pages
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - t0
    return timings[torch.bfloat16] < 0.9 * timings[torch.float32]
