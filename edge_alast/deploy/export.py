"""Exporting a run's tuned model to ONNX for deployment, checked in onnxruntime before publishing (the weights
themselves are saved and loaded by :mod:`edge_alast.runfolder`).

Exporter: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). The dynamo exporter needs
``onnxscript``, which is not part of the pinned stack (torch 2.13 raises ``ModuleNotFoundError: onnxscript``), and
ONNX Runtime training needs the legacy exporter's training mode anyway (see ``ort_training.py``).

Every file is published atomically: the ONNX model is written to a temp file beside its final name, checked for
parity against PyTorch in onnxruntime, and only then renamed into place; ``manifest.json`` comes last.
"""
from __future__ import annotations

import gc
import io
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

from .. import __version__
from ..atomic import atomic_write, atomic_write_json, atomic_write_path, sha256_bytes, sha256_file
from ..errors import ConfigError, EdgeAlastError
from ..data.images import LEGACY_CROP
from ..device.memory import trim_heap
from ..runfolder import load_run_model
from .onnxmeta import build_metadata, decode_metadata, limit_ir_version, set_metadata
from .predict import session

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


# ---------------------------------------------------------------------------------------------- ONNX helpers
def _check_plain(model: nn.Module) -> None:
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise ExportError(f"model has forward hooks on {', '.join(hooked[:4])}: remove the ALaST patch "
                          "(handle.remove()) before exporting")


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, training: bool = False,
               export_params: bool = True) -> bytes:
    """Export with the legacy exporter and a dynamic batch axis; returns the serialised model.

    With ``export_params`` (ONNX Runtime training artifacts) the weights are in it; without, each weight is a graph
    input and constant folding is off, for the inference export that streams its weights (:func:`write_onnx`). An
    inference trace runs under ``torch.no_grad()``: with autograd on, the trace keeps a graph of the example's
    activations.
    """
    buf = io.BytesIO()
    kwargs = {"do_constant_folding": export_params and not training}
    if training:
        kwargs["training"] = torch.onnx.TrainingMode.TRAINING
    with warnings.catch_warnings(), (nullcontext() if training else torch.no_grad()):
        warnings.simplefilter("ignore")  # TracerWarnings from timm's shape asserts and the exporter's deprecation
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, export_params=export_params,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
    return buf.getvalue()


def _graph_only(model: nn.Module, example: torch.Tensor, opset: int):
    """The exported graph without its weights: each parameter (and buffer) is a graph input named by its
    ``state_dict`` key. No constant folding: folded weights would get exporter-made names with no tensor to read
    them from (the 2-D weight transposes it would fold are folded by :func:`write_onnx` instead)."""
    import onnx

    return onnx.load_from_string(onnx_bytes(model, example, opset, export_params=False))


def write_onnx(model: nn.Module, example: torch.Tensor, opset: int, path: Path, meta_props: dict[str, str]) -> int:
    """Export ``model`` to ``path`` with the weights streamed in one tensor at a time; returns the IR version.

    ``torch.onnx.export(export_params=True)`` builds the whole serialised model in memory: 3.6 x the weights
    above the process for ViT-S/14 (296 MiB), the export's peak on a small device. Here the exporter writes only
    the graph (46 MiB for ViT-S/14), the parameter inputs become initializers, and each initializer is appended to
    the file as its own serialised ``ModelProto {graph {initializer}}`` fragment: protobuf parses concatenated
    messages as one merged message (repeated fields append), so the file is an ordinary single-file ONNX model
    while at most one tensor is serialised at a time. ``Transpose`` nodes over 2-D weights (every ``nn.Linear``)
    are folded into transposed initializers, as the exporter's constant folding would.
    """
    import onnx
    from onnx import numpy_helper

    proto = _graph_only(model, example, opset)
    state = model.state_dict()  # tensors sharing the parameters' storage: no copy
    graph = proto.graph
    params = [i.name for i in graph.input if i.name != INPUT_NAME]
    unknown = [name for name in params if name not in state]
    if unknown:
        raise ExportError(f"ONNX export: graph inputs {', '.join(unknown[:4])} are not parameters or buffers of "
                          f"{type(model).__name__}")
    folded: dict[str, str] = {}  # initializer name -> parameter, for transposed 2-D weights
    nodes = onnx.GraphProto()  # the graph's nodes and inputs are rebuilt (copies: the graph is small)
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type == "Transpose" and node.input[0] in state and state[node.input[0]].dim() == 2 \
                and perm == [1, 0]:
            folded[node.output[0]] = node.input[0]
        else:
            nodes.node.add().CopyFrom(node)
    for value in graph.input:
        if value.name == INPUT_NAME:
            nodes.input.add().CopyFrom(value)
    graph.ClearField("node")
    graph.ClearField("input")
    graph.node.extend(nodes.node)
    graph.input.extend(nodes.input)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    direct = [name for name in params if name in used]
    set_metadata(proto, meta_props)
    limit_ir_version(proto)
    ir_version = proto.ir_version

    def fragment(name: str, tensor: torch.Tensor) -> bytes:
        chunk = onnx.ModelProto()
        chunk.graph.initializer.append(numpy_helper.from_array(tensor.detach().contiguous().numpy(), name))
        return chunk.SerializeToString()

    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        del proto
        for name in direct:
            f.write(fragment(name, state[name]))
        for name, param in folded.items():
            f.write(fragment(name, state[param].t()))
    return ir_version


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
    was_training = model.training
    try:
        return _export([model], path, img_size=img_size, class_names=class_names, mean=mean, std=std,
                       base_model=base_model, profile=profile, summary=summary, opset=opset,
                       parity_images=parity_images, parity_labels=parity_labels, interpolation=interpolation,
                       crop_pct=crop_pct, crop_mode=crop_mode, formats=formats, seed=seed, batch_size=batch_size)
    finally:
        model.train(was_training)


def _export(owner: list[nn.Module], path: str | os.PathLike, *, img_size: int, class_names: Sequence[str],
            mean: Sequence[float], std: Sequence[float], base_model: str | None, profile: str | None,
            summary: dict | None, opset: int, parity_images: torch.Tensor | None, parity_labels: Sequence[int] | None,
            interpolation: str, crop_pct: float, crop_mode: str, formats: Sequence[str], seed: int,
            batch_size: int | None) -> dict[str, Any]:
    """:func:`export_onnx` for a model in ``owner`` (a one-item list): once the ONNX file is written the model is
    dropped from it, so where ``owner`` held the last reference (:func:`export_run`) the PyTorch weights are freed
    before onnxruntime loads its copy for the parity check (one copy of the weights less at the export's peak)."""
    import onnx

    formats = ["fp32"] + [f for f in formats if f != "fp32"]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--format: unknown {', '.join(unknown)} (known: {', '.join(FORMATS)}, ort-training)")
    path = Path(path)
    model = owner[0]
    _check_plain(model)
    model.eval()
    # ------------------------------------------------------------------------ export and metadata
    if parity_images is None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 3, img_size, img_size, generator=g)
        source = "random"
    else:
        x = parity_images.detach().float().cpu()
        source = "images"
    meta_props = build_metadata(class_names=class_names, img_size=img_size, mean=mean, std=std,
                                base_model=base_model, profile=profile, summary=summary,
                                interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    chunks = x.split(batch_size or len(x))  # at the run's evaluation batch: no larger transient than its eval
    with torch.no_grad():
        ref = np.concatenate([model(c).float().numpy() for c in chunks])
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # the file's size, ~
    del model  # ``owner`` holds it until the file is written
    labels = np.asarray(parity_labels) if parity_labels is not None else None
    one = x[:1].numpy()
    blobs, entries, checked = {}, {}, {}

    def export_and_check(tmp: Path) -> None:
        """Write the fp32 model to ``tmp`` and check it (and the other formats) before it is published."""
        try:
            checked["ir_version"] = write_onnx(owner[0], x[:2], opset, tmp, meta_props)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - an exporter failure is an export error to the user
            raise ExportError(f"ONNX export of {base_model or type(owner[0]).__name__} failed: "
                              f"{type(e).__name__}: {e}") from e
        owner.clear()  # the weights now live in the file (and, for the check, in onnxruntime)
        gc.collect()  # the trace leaves reference cycles that hold tensors
        trim_heap()
        sess = session(tmp)

        def run_onnx(s) -> np.ndarray:
            return np.concatenate([s.run(None, {INPUT_NAME: c.numpy()})[0] for c in chunks])

        got = run_onnx(sess)
        max_diff = float(np.abs(got - ref).max())
        argmax_equal = bool((got.argmax(-1) == ref.argmax(-1)).all())
        checked["parity"] = {"max_abs_diff": max_diff, "argmax_equal": argmax_equal, "images": int(len(x)),
                             "source": source, "atol": PARITY_ATOL}
        if not (max_diff <= PARITY_ATOL and argmax_equal):
            mismatches = int((got.argmax(-1) != ref.argmax(-1)).sum())
            raise ParityError(f"ONNX parity check failed for {path}: max |logit diff| {max_diff:.3g} "
                              f"(tolerance {PARITY_ATOL:g}), argmax differs on {mismatches} of {len(x)} inputs; "
                              "nothing was written")
        # ---------------------------------------------------------------- formats, accuracy, latency
        for fmt in formats:
            data = None if fmt == "fp32" else _convert(fmt, tmp.read_bytes(), meta_props)
            s = sess if fmt == "fp32" else session(data)
            logits = got if fmt == "fp32" else run_onnx(s)
            digest, size = (sha256_file(tmp), tmp.stat().st_size) if data is None else (sha256_bytes(data), len(data))
            entry = {"file": FORMAT_FILES[fmt], "sha256": digest, "size_bytes": size,
                     "latency_ms_batch1": _median_latency_ms(s, one),
                     "top1_agreement_with_pytorch": float((logits.argmax(-1) == ref.argmax(-1)).mean())}
            if fmt != "fp32":
                entry["max_abs_diff_vs_pytorch"] = float(np.abs(logits.astype(np.float32) - ref).max())
                blobs[fmt] = data
            if labels is not None:
                entry["accuracy"] = float((logits.argmax(-1) == labels).mean())
            entries[fmt] = entry

    # published only once checked; on failure nothing is left; the free space is checked first (DiskFullError)
    atomic_write_path(path, export_and_check, needed=weight_bytes, what="ONNX export")
    parity, ir_version = checked["parity"], checked["ir_version"]

    # ---------------------------------------------------------------------------- publish
    for fmt, data in blobs.items():
        atomic_write(path.with_name(FORMAT_FILES[fmt]), lambda f, data=data: f.write(data), needed=len(data),
                     what=f"ONNX export ({fmt})")
    manifest = {
        "file": path.name, "sha256": entries["fp32"]["sha256"], "size_bytes": entries["fp32"]["size_bytes"],
        "formats": entries, "parity": parity, "metadata": decode_metadata(meta_props),
        "metadata_props": meta_props, "opset": opset, "ir_version": ir_version,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(class_names)]},
        "exporter": "torch.onnx.export(dynamo=False, export_params=False) (TorchScript), initializers streamed",
        "torch_version": torch.__version__,
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
    from ..data.loader import Preprocess, load_batch
    from ..data.images import scan_image_folder

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
    owner = [model]
    del model  # the export frees the weights once they are in the file
    return _export(owner, run_dir / ONNX_FILE, img_size=meta["img_size"], class_names=meta["classes"],
                   mean=meta["mean"], std=meta["std"], base_model=meta["model_name"], profile=meta["profile"],
                   summary=meta["summary"], opset=opset, parity_images=images, parity_labels=labels,
                   interpolation=meta["interpolation"], crop_pct=meta["crop_pct"], crop_mode=meta["crop_mode"],
                   formats=formats, seed=0, batch_size=batch_size)
