"""Saving a run's tuned model and exporting it to ONNX for deployment, checked in onnxruntime before publishing.

Exporter: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). The dynamo exporter needs
``onnxscript``, which is not part of the pinned stack (torch 2.13 raises ``ModuleNotFoundError: onnxscript``), and
ONNX Runtime training needs the legacy exporter's training mode anyway (see ``ort_training.py``).

Every file is published atomically: the ONNX model is written to a temp file beside its final name, checked for
parity against PyTorch in onnxruntime, and only then renamed into place; ``manifest.json`` comes last.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import atomic_write, atomic_write_json, atomic_write_path
from .errors import ConfigError, EdgeAlastError
from .images import LEGACY_CROP
from .predict import build_metadata, decode_metadata, limit_ir_version, session, set_metadata

MODEL_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4
PARITY_IMAGES = 32
FORMATS = ("fp32", "fp16", "int8")
FORMAT_FILES = {"fp32": ONNX_FILE, "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(EdgeAlastError):
    """The model could not be exported (exit code 1)."""


class ParityError(ExportError):
    """onnxruntime's logits differ from PyTorch's beyond tolerance; nothing was published."""


# ---------------------------------------------------------------------------------------------- run folder model
def save_model(model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``RUN_DIR/model.safetensors`` atomically."""
    import safetensors.torch

    # save_model writes straight from the parameters (it handles shared tensors itself): no copy of the weights
    # in memory, which would raise the run's peak RSS on a small device.
    return atomic_write_path(Path(run_dir) / MODEL_FILE, lambda tmp: safetensors.torch.save_model(
        model, str(tmp), metadata={"format": "pt", "edge_alast_version": __version__}))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path.parent}: not a run folder ({path.name} missing)") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's timm model from ``config.json``/``summary.json`` and load ``model.safetensors``.

    Returns:
        The model (eval mode) and facts about it: ``model_name``, ``classes``, ``img_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode`` (the eval transform the run trained and evaluated with, from
        its summary; runs from before it was recorded squashed the whole image: :data:`images.LEGACY_CROP`),
        ``profile``, ``config`` (the run's TrainConfig dict) and ``summary``.

    Raises:
        ConfigError: the folder is not a finished run, or has no saved weights.
    """
    from .lightpeft import apply_pruning, structure_from_state_dict
    from .models import create_model, data_config, read_state_dict

    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json").get("config", {})
    summary = _read_json(run_dir / "summary.json")
    weights = run_dir / MODEL_FILE
    if not weights.is_file():
        raise ConfigError(f"{run_dir}: no {MODEL_FILE} (runs save their weights at the end of training)")
    classes = summary.get("classes") or []
    name = config.get("model") or summary.get("model")
    img_size = int(config.get("img_size") or summary.get("img_size"))
    model = create_model(name, num_classes=len(classes), img_size=img_size, **(config.get("model_args") or {}))
    state = read_state_dict(weights)
    structure = structure_from_state_dict(model, state)
    if structure is not None:  # a Light-PEFT run: fewer heads / FFN units per block, read off the weights' shapes
        apply_pruning(model, structure)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # the file's tensors, not a second copy
    except RuntimeError as e:
        raise ConfigError(f"{weights} does not match {name} with {len(classes)} classes: {e}") from e
    model.eval()
    transform = summary.get("eval_transform") or LEGACY_CROP
    meta = {"model_name": name, "classes": list(classes), "img_size": img_size, **data_config(model),
            "crop_pct": float(transform["crop_pct"]), "crop_mode": transform["crop_mode"],
            "profile": summary.get("profile"), "config": config, "summary": summary}
    return model, meta


# ---------------------------------------------------------------------------------------------- ONNX helpers
def _check_plain(model: nn.Module) -> None:
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise ExportError(f"model has forward hooks on {', '.join(hooked[:4])}: remove the ALaST patch "
                          "(handle.remove()) before exporting")


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, training: bool = False) -> bytes:
    """Export with the legacy exporter and a dynamic batch axis; returns the serialised model.

    An inference export traces under ``torch.no_grad()``: with autograd on, the trace keeps a graph of the example's
    activations, and the export of ViT-S/14 peaked at 7.0x the weights above the process instead of 3.5x.
    """
    buf = io.BytesIO()
    kwargs = {}
    if training:
        kwargs = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
    with warnings.catch_warnings(), (nullcontext() if training else torch.no_grad()):
        warnings.simplefilter("ignore")  # TracerWarnings from timm's shape asserts and the exporter's deprecation
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, export_params=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    return buf.getvalue()


def _median_latency_ms(sess, x: np.ndarray, runs: int = 10, warmup: int = 2) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _convert(fmt: str, fp32: bytes, meta_props: dict[str, str]) -> bytes:
    """fp16 (weights and activations, fp32 inputs/outputs) or int8 (dynamic quantisation of MatMul weights)."""
    import onnx

    if fmt == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            src.write_bytes(fp32)
            # MatMul/Gemm only: the CPU provider has no ConvInteger kernel (the patch embedding is a Conv)
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            out = onnx.load(str(dst))
    set_metadata(out, meta_props)
    limit_ir_version(out)
    return out.SerializeToString()


# ---------------------------------------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | os.PathLike, *, img_size: int, class_names: Sequence[str],
                mean: Sequence[float], std: Sequence[float], base_model: str | None, profile: str | None,
                summary: dict | None, opset: int = DEFAULT_OPSET, parity_images: torch.Tensor | None = None,
                parity_labels: Sequence[int] | None = None, interpolation: str = "bicubic",
                crop_pct: float = LEGACY_CROP["crop_pct"], crop_mode: str = LEGACY_CROP["crop_mode"],
                formats: Sequence[str] = ("fp32",), seed: int = 0, batch_size: int | None = None) -> dict[str, Any]:
    """Export ``model`` (eval mode, all tokens, no hooks) to ``path`` and write ``manifest.json`` beside it.

    Args:
        model: A plain timm model (any ALaST patch removed).
        path: The ONNX file to write; other formats go beside it (``model.fp16.onnx``, ``model.int8.onnx``).
        parity_images: A preprocessed image batch for the parity check; default: 8 seeded random inputs.
        parity_labels: Their labels, to report each format's accuracy.
        interpolation, crop_pct, crop_mode: The eval transform (metadata, so ``predict`` reproduces it).
        formats: Any of ``fp32`` (always written), ``fp16``, ``int8``.
        batch_size: Images per forward in the parity check (default: all at once).

    Returns:
        The manifest (as written).

    Raises:
        ParityError: onnxruntime's logits differ from PyTorch's by more than 1e-4 or in argmax (nothing written).
    """
    import onnx

    formats = ["fp32"] + [f for f in formats if f != "fp32"]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--format: unknown {', '.join(unknown)} (known: {', '.join(FORMATS)}, ort-training)")
    path = Path(path)
    _check_plain(model)
    was_training = model.training
    model.eval()
    try:
        # ------------------------------------------------------------------------ export and metadata
        if parity_images is None:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(8, 3, img_size, img_size, generator=g)
            source = "random"
        else:
            x = parity_images.detach().float().cpu()
            source = "images"
        try:
            raw = onnx_bytes(model, x[:2], opset)
        except Exception as e:  # noqa: BLE001 - an exporter failure is an export error to the user
            raise ExportError(f"ONNX export of {base_model or type(model).__name__} failed: "
                              f"{type(e).__name__}: {e}") from e
        proto = onnx.load_from_string(raw)
        del raw  # each copy of the weights counts on a small device: raw, proto, fp32, the session
        meta_props = build_metadata(class_names=class_names, img_size=img_size, mean=mean, std=std,
                                    base_model=base_model, profile=profile, summary=summary,
                                    interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
        set_metadata(proto, meta_props)
        limit_ir_version(proto)
        fp32 = proto.SerializeToString()
        ir_version = proto.ir_version
        del proto

        # ------------------------------------------------------------------------ parity (before publishing)
        chunks = x.split(batch_size or len(x))  # at the run's evaluation batch: no larger transient than its eval
        with torch.no_grad():
            ref = np.concatenate([model(c).float().numpy() for c in chunks])
        sess = session(fp32)

        def run_onnx(s) -> np.ndarray:
            return np.concatenate([s.run(None, {INPUT_NAME: c.numpy()})[0] for c in chunks])

        got = run_onnx(sess)
        max_diff = float(np.abs(got - ref).max())
        argmax_equal = bool((got.argmax(-1) == ref.argmax(-1)).all())
        parity = {"max_abs_diff": max_diff, "argmax_equal": argmax_equal, "images": int(len(x)),
                  "source": source, "atol": PARITY_ATOL}
        if not (max_diff <= PARITY_ATOL and argmax_equal):
            mismatches = int((got.argmax(-1) != ref.argmax(-1)).sum())
            raise ParityError(f"ONNX parity check failed for {path}: max |logit diff| {max_diff:.3g} "
                              f"(tolerance {PARITY_ATOL:g}), argmax differs on {mismatches} of {len(x)} inputs; "
                              "nothing was written")

        # ------------------------------------------------------------------------ formats, accuracy, latency
        labels = np.asarray(parity_labels) if parity_labels is not None else None
        one = x[:1].numpy()
        blobs, entries = {}, {}
        for fmt in formats:
            data = fp32 if fmt == "fp32" else _convert(fmt, fp32, meta_props)
            s = sess if fmt == "fp32" else session(data)
            logits = got if fmt == "fp32" else run_onnx(s)
            entry = {"file": FORMAT_FILES[fmt], "sha256": _sha256(data), "size_bytes": len(data),
                     "latency_ms_batch1": _median_latency_ms(s, one),
                     "top1_agreement_with_pytorch": float((logits.argmax(-1) == ref.argmax(-1)).mean())}
            if fmt != "fp32":
                entry["max_abs_diff_vs_pytorch"] = float(np.abs(logits.astype(np.float32) - ref).max())
            if labels is not None:
                entry["accuracy"] = float((logits.argmax(-1) == labels).mean())
            blobs[fmt], entries[fmt] = data, entry
    finally:
        model.train(was_training)

    # ---------------------------------------------------------------------------- publish
    for fmt in formats:
        target = path if fmt == "fp32" else path.with_name(FORMAT_FILES[fmt])
        atomic_write(target, lambda f, data=blobs[fmt]: f.write(data))
    manifest = {
        "file": path.name, "sha256": entries["fp32"]["sha256"], "size_bytes": entries["fp32"]["size_bytes"],
        "formats": entries, "parity": parity, "metadata": decode_metadata(meta_props),
        "metadata_props": meta_props, "opset": opset, "ir_version": ir_version,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(class_names)]},
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript)", "torch_version": torch.__version__,
        "onnx_version": onnx.__version__, "onnxruntime_version": _ort_version(),
        "edge_alast_version": __version__,
    }
    atomic_write_json(path.parent / MANIFEST_FILE, manifest)
    return manifest


def _ort_version() -> str:
    from .predict import import_onnxruntime

    return import_onnxruntime().__version__


def validation_batch(val_data: str | os.PathLike, meta: dict[str, Any],
                     limit: int = PARITY_IMAGES) -> tuple[torch.Tensor, list[int]]:
    """Up to ``limit`` preprocessed validation images, spread evenly over the folder (every class), with labels."""
    from .data import Preprocess, load_batch
    from .images import scan_image_folder

    folder = scan_image_folder(val_data, classes=meta["classes"], option="--val-data")
    stride = max(1, len(folder.samples) // limit)
    samples = folder.samples[::stride][:limit]
    x, y = load_batch(samples, range(len(samples)), Preprocess.from_meta(meta))
    return x, y.tolist()


def export_run(run_dir: str | os.PathLike, val_data: str | os.PathLike | None = None,
               formats: Sequence[str] = ("fp32",), opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export a finished run to ``RUN_DIR/model.onnx`` + ``RUN_DIR/manifest.json``.

    Parity and accuracy use up to 32 images of ``val_data`` (default: the run's ``val_data``, when it had one;
    else seeded random inputs and no accuracy), in batches of the run's evaluation batch, so the export needs no
    larger activations than the run's own evaluation did.
    """
    run_dir = Path(run_dir)
    model, meta = load_run_model(run_dir)
    batch_size = meta["config"].get("eval_batch_size") or meta["summary"].get("batch_size")
    val_data = val_data or meta["config"].get("val_data")
    images = labels = None
    if val_data:
        images, labels = validation_batch(val_data, meta)
    return export_onnx(model, run_dir / ONNX_FILE, img_size=meta["img_size"], class_names=meta["classes"],
                       mean=meta["mean"], std=meta["std"], base_model=meta["model_name"], profile=meta["profile"],
                       summary=meta["summary"], opset=opset, parity_images=images, parity_labels=labels,
                       interpolation=meta["interpolation"], crop_pct=meta["crop_pct"], crop_mode=meta["crop_mode"],
                       formats=formats, batch_size=batch_size)
