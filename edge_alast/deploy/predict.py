"""Deployment-side prediction with an exported ONNX model: onnxruntime, PIL and numpy only, never torch.

What the model needs to be used (class names, input size, mean/std, the eval transform) is read from its
metadata (:mod:`.onnxmeta`).

Why :func:`import_onnxruntime` exists: the ``onnxruntime-training`` build imports ``onnxruntime.training.ortmodule``
from ``import onnxruntime`` (to validate its build), which imports torch whenever torch is installed -- about 2 s
and a few hundred MB for nothing. We hide torch for the duration of that import, exactly as on a device where torch
is not installed; ORTModule, the only part that needs torch, is not used by edge-alast.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..data.images import load_image
from .onnxmeta import image_args, load_model_file, model_metadata


# ---------------------------------------------------------------------------------------------- onnxruntime import
@contextmanager
def _torch_hidden():
    """Make ``import torch`` fail (and ``find_spec('torch')`` return None) unless torch is already loaded."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def import_onnxruntime():
    """``import onnxruntime`` without it importing torch (see module docstring); logs at warning level and up only."""
    with _torch_hidden():
        import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


# --provider values -> onnxruntime execution providers, best first for "auto"
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)


# Where an NVIDIA GPU shows itself without importing torch: the driver's device node, or a Jetson's L4T release.
GPU_MARKERS = ("/dev/nvidia0", "/dev/nvhost-gpu", "/etc/nv_tegra_release")


def host_has_gpu(markers: Sequence[str] = GPU_MARKERS) -> bool:
    return any(os.path.exists(m) for m in markers)


def choose_provider(choice: str, available: Sequence[str], has_gpu: bool | None = None) -> tuple[str, str | None]:
    """The execution provider for ``--provider choice`` among onnxruntime's ``available`` ones, and a warning.

    ``auto`` takes the best one present (TensorRT, CUDA, CPU); when that is the CPU on a host with an NVIDIA GPU
    (``has_gpu``, default :func:`host_has_gpu`) it warns that it fell back. A provider asked for by name that this
    onnxruntime build lacks is a ConfigError naming the build's providers.
    """
    if choice == "auto":
        for name in PROVIDERS:
            if PROVIDERS[name] in available:
                gpu = host_has_gpu() if has_gpu is None else has_gpu
                warning = None if name != "cpu" or not gpu else (
                    f"--provider auto: this host has an NVIDIA GPU but this onnxruntime build has no GPU execution "
                    f"provider ({', '.join(available)}): running on the CPU (install onnxruntime-gpu)")
                return PROVIDERS[name], warning
        raise ConfigError(f"--provider auto: onnxruntime offers none of {', '.join(PROVIDERS.values())}")
    if choice not in PROVIDERS:
        raise ConfigError(f"--provider: must be one of {', '.join(PROVIDER_CHOICES)}, got {choice!r}")
    if PROVIDERS[choice] not in available:
        raise ConfigError(f"--provider {choice}: this onnxruntime build has no {PROVIDERS[choice]} (it offers "
                          f"{', '.join(available)}; install onnxruntime-gpu for CUDA/TensorRT)")
    return PROVIDERS[choice], None


def session(model: str | os.PathLike | bytes, threads: int | None = None, provider: str = "cpu",
            on_warning=None):
    """An onnxruntime ``InferenceSession`` for a model path or serialised model bytes, on ``provider``
    (:data:`PROVIDER_CHOICES`; a GPU provider keeps the CPU as onnxruntime's fallback for unsupported nodes)."""
    ort = import_onnxruntime()
    chosen, warning = choose_provider(provider, ort.get_available_providers())
    if warning and on_warning:
        on_warning(warning)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    source = model if isinstance(model, bytes) else str(model)
    providers = [chosen] if chosen == PROVIDERS["cpu"] else [chosen, PROVIDERS["cpu"]]
    sess = ort.InferenceSession(source, options, providers=providers)
    if sess.get_providers()[0] != chosen and on_warning:  # e.g. CUDA present but its libraries failed to load
        on_warning(f"--provider {provider}: onnxruntime could not start {chosen}; running on "
                   f"{sess.get_providers()[0]}")
    return sess


# ---------------------------------------------------------------------------------------------- prediction
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(model_path: str | os.PathLike, images: Iterable[str | os.PathLike], top_k: int = 5,
            batch_size: int = 16, threads: int | None = None, provider: str = "cpu",
            on_warning=None) -> list[dict[str, Any]]:
    """Classify images with an exported model on onnxruntime's ``provider`` (:func:`choose_provider`).

    Returns:
        One dict per image, in order: ``{"image": path, "provider": the execution provider used, "top": [{"class",
        "index", "probability"}, ...]}``, best first; for a file that cannot be read (missing, over the image
        limits, or failing to decode), ``{"image": path, "error": why}`` instead, and the other images go on.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {top_k}")
    # Only self-contained models with bounded, valid metadata reach onnxruntime, which loads them from these bytes
    # (onnxmeta.load_model_file): a model cannot make it read another file.
    data, proto = load_model_file(model_path)
    meta = model_metadata(proto, str(model_path))
    del proto
    try:
        sess = session(data, threads, provider=provider, on_warning=on_warning)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors (Fail, InvalidGraph, ...): the file is at fault
        raise ConfigError(f"{model_path}: onnxruntime cannot load it: {type(e).__name__}: {e}") from None
    del data
    used = sess.get_providers()[0]
    names = meta["class_names"]
    input_name = sess.get_inputs()[0].name
    paths = [str(p) for p in images]
    results = []
    for start in range(0, len(paths), batch_size):
        chunk, xs, read = paths[start:start + batch_size], [], {}
        for path in chunk:
            try:
                xs.append(load_image(path, **image_args(meta)))
                read[path] = len(xs) - 1
            except DataError as e:
                read[path] = str(e).removeprefix(f"{path}: ")
        try:
            logits = sess.run(None, {input_name: np.stack(xs)})[0] if xs else None
        except Exception as e:  # noqa: BLE001 - a graph that does not take its own metadata's input
            raise ConfigError(f"{model_path}: onnxruntime cannot run it on {meta['img_size']} px images: "
                              f"{type(e).__name__}: {e}") from None
        probs = softmax(logits.astype(np.float64)) if xs else []
        for path in chunk:
            if isinstance(read[path], str):
                results.append({"image": path, "error": read[path]})
                continue
            p = probs[read[path]]
            order = np.argsort(-p, kind="stable")[:top_k]
            results.append({"image": path, "provider": used, "top": [
                {"class": names[i] if i < len(names) else str(i), "index": int(i), "probability": float(p[i])}
                for i in order]})
    return results
