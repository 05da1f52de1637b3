"""What an exported ONNX model carries about itself: edge-alast's ``metadata_props`` and the IR version cap.

Everything the model needs to be used (class names, input size, mean/std, the eval transform's interpolation,
crop_pct and crop_mode) travels inside the ONNX file as ``metadata_props`` under the ``edge_alast.`` prefix;
:func:`build_metadata` writes them (for the torch exporter and for ONNX Runtime training alike) and
:func:`read_metadata` reads them back. Torch-free: ``predict`` and ``train-ort`` read them on a device without
torch, and ``export`` writes them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from ..data.images import LEGACY_CROP
from ..errors import ConfigError

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
    if hasattr(model, "get_modelmeta"):
        sess = model
    else:
        from .predict import session  # an onnxruntime session reads the metadata without loading the weights twice

        sess = session(model)
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


def image_args(meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`~edge_alast.data.images.load_image`'s arguments for a model's metadata: its eval transform. A model
    exported before ``crop_pct``/``crop_mode`` travelled gets the whole image squashed to a square, as it was
    trained (:data:`~edge_alast.data.images.LEGACY_CROP`)."""
    return {"img_size": int(meta["img_size"]), "mean": meta["mean"], "std": meta["std"],
            "interpolation": meta.get("interpolation", "bicubic"),
            "crop_pct": float(meta.get("crop_pct", LEGACY_CROP["crop_pct"])),
            "crop_mode": meta.get("crop_mode", LEGACY_CROP["crop_mode"])}
