"""What an exported ONNX model carries about itself: edge-alast's ``metadata_props`` and the IR version cap.

Everything the model needs to be used (class names, input size, mean/std, the eval transform's interpolation,
crop_pct and crop_mode) travels inside the ONNX file as ``metadata_props`` under the ``edge_alast.`` prefix;
:func:`build_metadata` writes them (for the torch exporter and for ONNX Runtime training alike) and
:func:`read_metadata` reads them back. Torch-free: ``predict`` and ``train-ort`` read them on a device without
torch, and ``export`` writes them.

What a model file may hold before it is handed to onnxruntime (:func:`load_model_file`): edge-alast's exports are
single files, so a tensor stored as *external data* (a path onnxruntime would open and read, ``/etc/passwd`` or
``../secret.bin``) is refused, and so are an empty, oversized or unparsable file. :func:`validate_metadata` bounds
every metadata field (sizes, types, ranges), so a model's claims cannot exhaust a board (an ``img_size`` of 60000)
or end in a traceback. Every refusal is a :class:`~edge_alast.errors.ConfigError` naming the file (exit 2).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..data.images import CROP_MODES, INTERPOLATION, LEGACY_CROP
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

# Bounds on what a model file may claim (load_model_file, validate_metadata)
MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit: a self-contained ONNX file is never larger
MAX_METADATA_VALUE_BYTES = 1 << 20  # one metadata_props value (the summary is the largest, a few KiB)
IMG_SIZE_RANGE = (8, 4096)  # pixels per side: a 4096 px fp32 input is 192 MiB per image
MAX_CLASSES, MAX_CLASS_NAME_CHARS = 100_000, 256


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


def decode_metadata(props: dict[str, str], source: str = "model") -> dict[str, Any]:
    """Prefixed string properties back to values (keys without the prefix); unknown keys are ignored.

    Raises:
        ConfigError: naming ``source`` and the key: a value over :data:`MAX_METADATA_VALUE_BYTES`, or not JSON
            where JSON is expected.
    """
    out = {}
    for key, is_json in METADATA_KEYS.items():
        raw = props.get(METADATA_PREFIX + key)
        if raw is None:
            continue
        if len(raw) > MAX_METADATA_VALUE_BYTES:
            raise ConfigError(f"{source}: metadata {METADATA_PREFIX}{key} holds {len(raw)} characters (at most "
                              f"{MAX_METADATA_VALUE_BYTES})")
        try:
            out[key] = json.loads(raw) if is_json else raw
        except ValueError as e:
            raise ConfigError(f"{source}: metadata {METADATA_PREFIX}{key} is not valid JSON: {e}") from None
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_metadata(meta: dict[str, Any], source: str = "model", num_outputs: int | None = None) -> dict[str, Any]:
    """Check every field ``predict`` uses (see module docstring); ``num_outputs``: the model's logits per image when
    its graph says (class_names must have as many). Returns ``meta``.

    Raises:
        ConfigError: naming ``source`` and the first bad field.
    """
    def bad(key: str, why: str) -> ConfigError:
        shown = repr(meta.get(key))
        return ConfigError(f"{source}: metadata {METADATA_PREFIX}{key} {why}, got "
                           f"{shown if len(shown) <= 80 else shown[:77] + '...'}")

    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"{source}: no edge-alast metadata ({', '.join(METADATA_PREFIX + k for k in missing)} "
                          "missing); export it with `edge-alast export`")
    low, high = IMG_SIZE_RANGE
    size = meta["img_size"]
    if not (isinstance(size, int) and not isinstance(size, bool) and low <= size <= high):
        raise bad("img_size", f"must be an integer in [{low}, {high}]")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(_finite_number(v) for v in values)):
            raise bad(key, "must be 3 finite numbers (one per RGB channel)")
    if not all(v > 0 for v in meta["std"]):
        raise bad("std", "must be > 0 per channel")
    names = meta["class_names"]
    if not (isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES
            and all(isinstance(n, str) and len(n) <= MAX_CLASS_NAME_CHARS for n in names)):
        raise bad("class_names", f"must be a list of 1 to {MAX_CLASSES} strings of at most {MAX_CLASS_NAME_CHARS} "
                                 "characters")
    if num_outputs is not None and num_outputs != len(names):
        raise bad("class_names", f"must name the model's {num_outputs} outputs")
    if "interpolation" in meta and meta["interpolation"] not in INTERPOLATION:
        raise bad("interpolation", f"must be one of {', '.join(INTERPOLATION)}")
    if "crop_mode" in meta and meta["crop_mode"] not in CROP_MODES:
        raise bad("crop_mode", f"must be one of {', '.join(CROP_MODES)}")
    if "crop_pct" in meta and not (_finite_number(meta["crop_pct"]) and 0 < meta["crop_pct"] <= 1):
        raise bad("crop_pct", "must be a number in (0, 1]")
    if "summary" in meta and not isinstance(meta["summary"], dict):
        raise bad("summary", "must be a JSON object")
    return meta


def _tensors(graph):
    """Every TensorProto of ``graph`` and its subgraphs: initializers, sparse initializers, node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def load_model_file(path: str | os.PathLike) -> tuple[bytes, Any]:
    """The bytes and parsed ``ModelProto`` of a self-contained ONNX file, for onnxruntime to load from the bytes
    (the file is read once, and nothing it names is ever opened).

    Raises:
        ConfigError: naming ``path``: missing, not a regular file, empty, over :data:`MAX_MODEL_BYTES`, not an
            ONNX model, or holding a tensor stored as external data.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: no such model file ({e.strerror})") from None
    if not path.is_file():
        raise ConfigError(f"{path}: not a model file")
    if info.st_size == 0:
        raise ConfigError(f"{path}: empty file, not an ONNX model")
    if info.st_size > MAX_MODEL_BYTES:
        raise ConfigError(f"{path}: {info.st_size} bytes, over the {MAX_MODEL_BYTES} bytes a single-file ONNX model "
                          "can hold")
    try:
        data = path.read_bytes()
        proto = onnx.ModelProto()
        proto.ParseFromString(data)
    except (OSError, DecodeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    if proto.ir_version < 1 or not proto.HasField("graph") or not proto.graph.output:
        raise ConfigError(f"{path}: not an ONNX model (no IR version or graph outputs)")
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ConfigError(f"{path}: tensor {tensor.name or '(unnamed)'} is stored as external data ({where!r}); "
                              "only self-contained models are loaded (edge-alast exports are single files), so no "
                              "other file is ever read")
    return data, proto


def output_classes(proto) -> int | None:
    """The logits per image of a model's first output, when its graph gives that dimension."""
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if len(dims) >= 2 and dims[-1].HasField("dim_value") else None


def model_metadata(proto, source: str = "model") -> dict[str, Any]:
    """The validated edge-alast metadata of a parsed model (:func:`validate_metadata`)."""
    props = {p.key: p.value for p in proto.metadata_props}
    return validate_metadata(decode_metadata(props, source), source, output_classes(proto))


def read_metadata(model: str | os.PathLike | Any) -> dict[str, Any]:
    """The edge-alast metadata of an ONNX file (read with :func:`load_model_file`) or of an open
    ``InferenceSession``, validated (:func:`validate_metadata`).

    Raises:
        ConfigError: naming the file: not a loadable model, or metadata missing (not exported by edge-alast) or
            out of bounds.
    """
    if hasattr(model, "get_modelmeta"):
        props = dict(model.get_modelmeta().custom_metadata_map)
        return validate_metadata(decode_metadata(props), "model")
    _, proto = load_model_file(model)
    return model_metadata(proto, str(model))


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
