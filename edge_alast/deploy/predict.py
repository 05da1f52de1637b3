"""Deployment-side prediction with an exported ONNX model: onnxruntime, PIL and numpy only, never torch.

Everything the model needs to be used (class names, input size, mean/std, the eval transform's interpolation,
crop_pct and crop_mode) travels inside the ONNX file as
``metadata_props`` under the ``edge_alast.`` prefix; :func:`build_metadata` writes them (for the torch exporter and
for ONNX Runtime training alike) and :func:`read_metadata` reads them back.

Why :func:`import_onnxruntime` exists: the ``onnxruntime-training`` build imports ``onnxruntime.training.ortmodule``
from ``import onnxruntime`` (to validate its build), which imports torch whenever torch is installed -- about 2 s
and a few hundred MB for nothing. We hide torch for the duration of that import, exactly as on a device where torch
is not installed; ORTModule, the only part that needs torch, is not used by edge-alast.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError
from ..data.images import LEGACY_CROP, load_image

METADATA_PREFIX = "edge_alast."
# key -> whether the value is JSON (lists, dicts, numbers) rather than a plain string
METADATA_KEYS = {
    "class_names": True,
    "img_size": True,
    "mean": True,
    "std": True,
    "interpolation": False,
    "crop_pct": True,
    "crop_mode": False,
    "base_model": False,
    "profile": False,
    "version": False,
    "summary": True,
}
REQUIRED_KEYS = ("class_names", "img_size", "mean", "std")
MAX_IR_VERSION = 10  # onnxruntime(-training) 1.19 refuses IR 11 (written by onnx >= 1.18)


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


def build_metadata(*, class_names: Sequence[str], img_size: int, mean: Sequence[float], std: Sequence[float],
                   base_model: str | None, profile: str | None, summary: dict | None,
                   interpolation: str = "bicubic", crop_pct: float = LEGACY_CROP["crop_pct"],
                   crop_mode: str = LEGACY_CROP["crop_mode"], version: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported model: prefixed keys, string values (JSON where structured)."""
    from .. import __version__

    values = {
        "class_names": list(class_names), "img_size": int(img_size),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std], "interpolation": interpolation,
        "crop_pct": float(crop_pct), "crop_mode": crop_mode, "base_model": base_model or "", "profile": profile or "",
        "version": version or __version__,
        "summary": summary or {},
    }
    return {METADATA_PREFIX + k: (json.dumps(v, sort_keys=True, default=str) if METADATA_KEYS[k] else str(v))
            for k, v in values.items()}


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """Prefixed string properties back to values (keys without the prefix); unknown keys are ignored."""
    out = {}
    for key, is_json in METADATA_KEYS.items():
        raw = props.get(METADATA_PREFIX + key)
        if raw is not None:
            out[key] = json.loads(raw) if is_json else raw
    return out


def read_metadata(model: str | os.PathLike | Any) -> dict[str, Any]:
    """The edge-alast metadata of an ONNX file (or of an open ``InferenceSession``).

    Raises:
        ConfigError: the model was not exported by edge-alast (required keys missing).
    """
    sess = model if hasattr(model, "get_modelmeta") else session(model)
    meta = decode_metadata(dict(sess.get_modelmeta().custom_metadata_map))
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"{model if isinstance(model, (str, os.PathLike)) else 'model'}: no edge-alast metadata "
                          f"({', '.join(METADATA_PREFIX + k for k in missing)} missing); export it with "
                          "`edge-alast export`")
    return meta


def limit_ir_version(proto) -> None:
    """Cap the IR version at one onnxruntime 1.19 loads (the parity run then proves the model still loads)."""
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace the model's edge-alast ``metadata_props`` with ``props``, keeping any others."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in keep + sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# ---------------------------------------------------------------------------------------------- preprocessing
def image_args(meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`~edge_alast.data.images.load_image`'s arguments for a model's metadata: its eval transform. A model
    exported before ``crop_pct``/``crop_mode`` travelled gets the whole image squashed to a square, as it was
    trained (:data:`~edge_alast.data.images.LEGACY_CROP`)."""
    return {"img_size": int(meta["img_size"]), "mean": meta["mean"], "std": meta["std"],
            "interpolation": meta.get("interpolation", "bicubic"),
            "crop_pct": float(meta.get("crop_pct", LEGACY_CROP["crop_pct"])),
            "crop_mode": meta.get("crop_mode", LEGACY_CROP["crop_mode"])}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------- prediction
def predict(model_path: str | os.PathLike, images: Iterable[str | os.PathLike], top_k: int = 5,
            batch_size: int = 16, threads: int | None = None, provider: str = "cpu",
            on_warning=None) -> list[dict[str, Any]]:
    """Classify images with an exported model on onnxruntime's ``provider`` (:func:`choose_provider`).

    Returns:
        One dict per image: ``{"image": path, "provider": the execution provider used, "top": [{"class", "index",
        "probability"}, ...]}``, best first.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {top_k}")
    if not Path(model_path).is_file():
        raise ConfigError(f"{model_path}: no such model file")
    sess = session(model_path, threads, provider=provider, on_warning=on_warning)
    used = sess.get_providers()[0]
    meta = read_metadata(sess)
    names = meta["class_names"]
    input_name = sess.get_inputs()[0].name
    paths = [str(p) for p in images]
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = np.stack([load_image(p, **image_args(meta)) for p in chunk])
        probs = softmax(sess.run(None, {input_name: x})[0].astype(np.float64))
        for path, p in zip(chunk, probs):
            order = np.argsort(-p, kind="stable")[:top_k]
            results.append({"image": path, "provider": used, "top": [
                {"class": names[i] if i < len(names) else str(i), "index": int(i), "probability": float(p[i])}
                for i in order]})
    return results
