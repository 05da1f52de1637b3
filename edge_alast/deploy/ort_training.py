"""On-device training with ONNX Runtime: artifacts from a finished run (needs torch), and a training loop over them
that needs only onnxruntime, PIL and numpy (no torch on the device).

Which blocks train: the ALaST budgets a run gave each block say where fine-tuning paid off. The blocks with the
highest budget averaged over the run (``budget/raw`` in ``metrics.jsonl``) are trainable -- by default the
top 25 % of blocks (at least one), plus the final norm and the head; everything else is frozen. Ties (every budget
of a ``full``/``head`` run is 1.0) go to the later blocks, nearest the head, which is also where a budget-free
choice would put them.

Pitfalls measured with torch 2.13 / onnxruntime-training 1.19 (see the issue):

* the training graph needs the legacy exporter in training mode without constant folding (folding bakes frozen
  and trainable weights alike into constants, and the gradient builder then finds no parameter to train);
* at opset 17, torch exports ``LayerNormalization`` with only its first output, and ORT's LayerNorm gradient
  needs the optional ``Mean``/``InvStdDev`` outputs: we add them to every LayerNormalization node;
* artifacts must carry IR version <= 10;
* ``onnxruntime/training/__init__.py`` imports modules that need torch, so on a torch-free device
  ``import onnxruntime.training.api`` fails; :func:`training_api` loads the ``api`` sub-package (which needs only
  onnxruntime's C extension) without running that ``__init__``.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..atomic import atomic_write, atomic_write_json, atomic_write_path
from ..errors import ConfigError, EdgeAlastError
from ..data.images import load_image, scan_image_folder, scan_warnings, split_samples
from ..model.names import block_index, is_final_norm, is_head
from ..runfolder import (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, budget_metric, load_run_model,
                         metric, read_metrics, steady)
from .onnxmeta import (MAX_IR_VERSION, build_metadata, decode_metadata, image_args, limit_ir_version,
                       load_model_file, set_metadata, validate_metadata)
from .predict import import_onnxruntime

ARTIFACTS_DIR = "ort_training"
META_FILE = "meta.json"
TRAINABLE_FRACTION = 0.25


class OrtTrainingError(EdgeAlastError):
    """Training artifacts could not be generated or used (exit code 1)."""


# ---------------------------------------------------------------------------------------------- policy (pure)
def average_budgets(metrics_path: str | os.PathLike, depth: int) -> list[float]:
    """Per-block ALaST budget (:func:`~edge_alast.runfolder.budget_metric`: runs from before ``budget/raw`` was
    logged give their plans' keep ratios) averaged over a run's steps; 1.0 per block when the file has none."""
    records = read_metrics(metrics_path)
    key = budget_metric(records)
    sums, count = [0.0] * depth, 0
    for record in records:
        ratios = metric(record, key) if key else None
        if isinstance(ratios, list) and len(ratios) == depth:
            sums = [s + float(r) for s, r in zip(sums, ratios)]
            count += 1
    return [s / count for s in sums] if count else [1.0] * depth


def choose_trainable_blocks(budgets: Sequence[float], fraction: float = TRAINABLE_FRACTION) -> list[int]:
    """The ``ceil(fraction * depth)`` blocks (at least one) with the highest budgets; ties go to later blocks."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--trainable-fraction: must be in (0, 1], got {fraction}")
    n = max(1, math.ceil(fraction * len(budgets) - 1e-9))
    order = sorted(range(len(budgets)), key=lambda i: (-budgets[i], -i))
    return sorted(order[:n])


def is_trainable(name: str, blocks: Sequence[int]) -> bool:
    """The final norm and the head always train; a block's parameters when the block is one of ``blocks``."""
    if is_final_norm(name) or is_head(name):
        return True
    return block_index(name) in blocks


# ---------------------------------------------------------------------------------------------- artifacts (torch)
@contextmanager
def _native_stderr_to(path: Path):
    """onnxruntime's gradient builder logs every graph pass to fd 2 whatever the log level: send it to a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def add_layernorm_outputs(proto) -> int:
    """Give every single-output LayerNormalization node its optional Mean and InvStdDev outputs (ORT's gradient
    needs them). Returns the number of nodes changed."""
    changed = 0
    for node in proto.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}__mean", f"{node.output[0]}__inv_std_dev"])
            changed += 1
    return changed


def require_training_build(command: str) -> None:
    """Raise a ConfigError naming the cause when this onnxruntime is not the training build: ONNX Runtime training
    shipped its last release (onnxruntime-training-cpu 1.19.2) for x86_64 only, and plain onnxruntime (aarch64
    boards, or a laptop that installed it) has no ``onnxruntime/training`` package."""
    import importlib.util
    import platform

    spec = importlib.util.find_spec("onnxruntime")
    folder = Path(spec.origin).parent / "training" if spec and spec.origin else None
    if folder is None or not (folder / "api").is_dir():
        have = "no onnxruntime" if spec is None else "plain onnxruntime"
        raise ConfigError(f"{command} needs the x86_64 onnxruntime-training build (onnxruntime-training-cpu 1.19.2, "
                          f"the last training release; none exists for {platform.machine()}): this host has {have}. "
                          "Fine-tune with `edge-alast train` instead")


def generate_training_artifacts(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                                trainable_fraction: float = TRAINABLE_FRACTION, opset: int = 17,
                                batch_size: int = 2) -> dict[str, Any]:
    """Write ONNX Runtime training artifacts for a finished run to ``out_dir`` (default ``RUN_DIR/ort_training``).

    The folder holds ``training_model.onnx``, ``eval_model.onnx``, ``optimizer_model.onnx`` (AdamW),
    ``checkpoint`` and ``meta.json`` (metadata, trainable blocks, budgets). It is built in a temp folder and moved
    into place, replacing an older one.

    Returns:
        The contents of ``meta.json``.
    """
    require_training_build("export --format ort-training")
    import onnx
    import torch
    from onnxruntime.training import artifacts

    from .export import onnx_bytes

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / ARTIFACTS_DIR
    model, meta = load_run_model(run_dir)
    depth = len(model.blocks)
    budgets = average_budgets(run_dir / METRICS_FILE, depth)
    blocks = choose_trainable_blocks(budgets, trainable_fraction)
    names = [n for n, _ in model.named_parameters()]
    requires_grad = [n for n in names if is_trainable(n, blocks)]
    frozen = [n for n in names if n not in requires_grad]

    model.train()
    example = torch.zeros(batch_size, 3, meta["img_size"], meta["img_size"])
    try:
        proto = onnx.load_from_string(onnx_bytes(model, example, opset, training=True))
    except Exception as e:  # noqa: BLE001
        raise OrtTrainingError(f"training-graph export of {meta['model_name']} failed: {type(e).__name__}: {e}") from e
    initializers = {i.name for i in proto.graph.initializer}
    lost = [n for n in names if n not in initializers]
    if lost:
        raise OrtTrainingError(f"the exported training graph lacks parameters {', '.join(lost[:5])}: "
                               "they were folded or renamed by the exporter")
    if opset >= 17:
        add_layernorm_outputs(proto)
    limit_ir_version(proto)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder should read like its run folder
    try:
        log = Path(tempfile.mkstemp(prefix=".ort-gen.", suffix=".log", dir=tmp)[1])
        try:
            with _native_stderr_to(log):
                artifacts.generate_artifacts(proto, requires_grad=requires_grad, frozen_params=frozen,
                                             loss=artifacts.LossType.CrossEntropyLoss,
                                             optimizer=artifacts.OptimType.AdamW, artifact_directory=str(tmp),
                                             additional_output_names=["logits"])
        except Exception as e:  # noqa: BLE001
            tail = log.read_text(errors="replace")[-2000:]
            raise OrtTrainingError(f"onnxruntime could not build the training artifacts: {type(e).__name__}: {e}"
                                   f"\n{tail}") from e
        log.unlink()
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            _cap_ir_version(tmp / name)
        info = {
            "metadata": build_metadata(class_names=meta["classes"], img_size=meta["img_size"], mean=meta["mean"],
                                       std=meta["std"], base_model=meta["model_name"], profile=meta["profile"],
                                       summary=meta["summary"], interpolation=meta["interpolation"],
                                       crop_pct=meta["crop_pct"], crop_mode=meta["crop_mode"]),
            "trainable_blocks": blocks, "average_budgets": budgets, "trainable_fraction": trainable_fraction,
            "requires_grad": requires_grad, "frozen_params": len(frozen), "opset": opset,
            "source_run": str(run_dir), "edge_alast_version": __version__,
        }
        atomic_write_json(tmp / META_FILE, info)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _cap_ir_version(path: Path) -> None:
    import onnx

    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        limit_ir_version(proto)
        data = proto.SerializeToString()
        atomic_write(path, lambda f: f.write(data))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an older ``dst`` is renamed aside first and deleted after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- torch-free data
def training_api():
    """``onnxruntime.training.api`` without torch (see module docstring)."""
    if "onnxruntime.training" not in sys.modules and "torch" not in sys.modules:
        ort = import_onnxruntime()
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [os.path.join(os.path.dirname(ort.__file__), "training")]
        pkg.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = pkg
    else:
        import_onnxruntime()
    return importlib.import_module("onnxruntime.training.api")


class _Loader:
    """The model's eval transform (metadata of artifacts made before it travelled there: the old squash)."""

    def __init__(self, meta: dict[str, Any]):
        self.args = image_args(meta)

    def __call__(self, samples, indices):
        x = np.stack([load_image(samples[i][0], **self.args) for i in indices]).astype(np.float32)
        y = np.asarray([samples[i][1] for i in indices], dtype=np.int64)
        return x, y


# ---------------------------------------------------------------------------------------------- training loop
ARTIFACT_MODELS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
MAX_META_BYTES = 2**20  # meta.json: a few KiB (metadata, block lists, parameter names)
MAX_CHECKPOINT_BYTES = 2**31 - 1  # a FlatBuffers file (ORT's checkpoint format) is never larger


def _read_artifacts(art: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta.json`` of an artifacts folder and its validated model metadata, with each ONNX file checked as
    ``predict`` checks a model (:func:`~edge_alast.deploy.onnxmeta.load_model_file`: a regular, self-contained file
    of at most 2 GiB) before onnxruntime opens it: the training API takes paths, not bytes, and would follow a
    tensor's external-data location to any file. The ``checkpoint`` must be a regular file of at most 2 GiB too.

    Raises:
        ConfigError: naming ``--artifacts`` and the file: missing, oversized, not JSON/ONNX, a key or metadata
            field missing or out of bounds.
    """
    where = f"--artifacts: {art}"
    path = art / META_FILE
    try:
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise ConfigError(f"{where}: {META_FILE} is {size} bytes, over the {MAX_META_BYTES} an artifacts "
                              "folder's holds")
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where} is not an edge-alast ORT training folder ({META_FILE}: {e})") from None
    blocks = info.get("trainable_blocks") if isinstance(info, dict) else None
    if not (isinstance(blocks, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
        raise ConfigError(f"{where}: {META_FILE} has no trainable_blocks list of block indices")
    if not isinstance(info.get("metadata"), dict):
        raise ConfigError(f"{where}: {META_FILE} has no metadata object (export the run again with "
                          "`edge-alast export --format ort-training`)")
    meta = validate_metadata(decode_metadata(info["metadata"], f"{path}"), f"{path}")
    for name in ARTIFACT_MODELS:
        load_model_file(art / name)
    checkpoint = art / "checkpoint"
    try:
        status = checkpoint.stat()
    except OSError as e:
        raise ConfigError(f"{where}: no checkpoint file ({e.strerror})") from None
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block onnxruntime's read forever, a device never end
        raise ConfigError(f"{where}: checkpoint is not a regular file")
    if not 0 < status.st_size <= MAX_CHECKPOINT_BYTES:
        raise ConfigError(f"{where}: checkpoint is {status.st_size} bytes; an ORT checkpoint holds 1 to "
                          f"{MAX_CHECKPOINT_BYTES}")
    return info, meta


def train_ort(artifacts_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, steps: int,
              val_data: str | os.PathLike | None = None, batch_size: int = 16, lr: float = 1e-4, seed: int = 0,
              val_fraction: float = 0.2, on_event: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Fine-tune from ONNX Runtime training artifacts; writes ``metrics.jsonl``, ``summary.json``, ``checkpoint``
    and ``model.onnx`` (inference model with edge-alast metadata) to ``out``.

    Args:
        val_data: Validation ImageFolder; default: a seeded ``val_fraction`` per-class split of ``data``.

    Returns:
        The summary (as written).
    """
    require_training_build("train-ort")
    import onnx

    from ..device.memory import peak_rss_bytes, rss_bytes

    emit = on_event or (lambda event: None)
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"--lr: must be > 0, got {lr}")
    art = Path(artifacts_dir)
    info, meta = _read_artifacts(art)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out: cannot create {out}: {e}") from e

    # ---------------------------------------------------------------- data
    folder = scan_image_folder(data, classes=meta["class_names"], option="--data")
    for w in scan_warnings(folder, "--data"):
        emit({"event": "warning", "message": w})
    if val_data:
        train_samples = folder.samples
        val_samples = scan_image_folder(val_data, classes=meta["class_names"], option="--val-data").samples
    else:
        train_samples, val_samples = split_samples(folder, val_fraction, seed)
    load = _Loader(meta)
    batch = min(batch_size, len(train_samples))
    per_epoch = len(train_samples) // batch
    rng_seed = seed * 1_000_003

    # ---------------------------------------------------------------- ORT session
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
    module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"), device="cpu")
    optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lr)
    start = {"event": "start", "method": "ort-training", "model": meta.get("base_model"), "steps": steps,
             "batch_size": batch, "device": "cpu", "train_images": len(train_samples),
             "val_images": len(val_samples), "trainable_blocks": info["trainable_blocks"], "run_dir": str(out)}
    atomic_write_json(out / CONFIG_FILE, {"config": {"artifacts": str(art), "data": str(data),
                                                     "val_data": str(val_data) if val_data else None,
                                                     "steps": steps, "batch_size": batch_size, "lr": lr,
                                                     "seed": seed, "val_fraction": val_fraction},
                                          "resolved": start})
    emit(start)

    # ---------------------------------------------------------------- training loop
    losses, step_seconds = [], []
    perm, epoch_of_perm = None, -1
    module.train()
    with open(out / METRICS_FILE, "w") as metrics:
        for step in range(steps):
            t0 = time.perf_counter()
            epoch, b = divmod(step, per_epoch)
            if epoch != epoch_of_perm:
                perm, epoch_of_perm = np.random.default_rng(rng_seed + epoch).permutation(len(train_samples)), epoch
            x, y = load(train_samples, perm[b * batch:(b + 1) * batch])
            loss = float(module(x, y)[0])
            optimizer.step()
            module.lazy_reset_grad()
            seconds = time.perf_counter() - t0
            losses.append(loss)
            step_seconds.append(seconds)
            record = {"event": "step", "step": step + 1, "loss": loss, "lr": lr, "time/step_seconds": seconds,
                      "blocks/trainable": info["trainable_blocks"], "mem/rss_bytes": rss_bytes(),
                      "mem/peak_rss_bytes": peak_rss_bytes()}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            emit(record)

    # ---------------------------------------------------------------- evaluation
    val_accuracy = val_loss = None
    if val_samples:
        module.eval()
        correct, loss_sum = 0, 0.0
        for s in range(0, len(val_samples), batch):
            idx = range(s, min(s + batch, len(val_samples)))
            x, y = load(val_samples, idx)
            loss, logits = module(x, y)
            loss_sum += float(loss) * len(y)  # the loss is the batch mean
            correct += int((np.asarray(logits).argmax(-1) == y).sum())
        val_accuracy, val_loss = correct / len(val_samples), loss_sum / len(val_samples)
        emit({"event": "eval", "val_accuracy": val_accuracy, "val_loss": val_loss, "val_images": len(val_samples)})

    # ---------------------------------------------------------------- summary, checkpoint, inference model
    steady_seconds = steady(step_seconds)
    summary = {
        "edge_alast_version": __version__, "method": "ort-training", "model": meta.get("base_model"),
        "profile": meta.get("profile") or None, "device": "cpu", "precision": "fp32", "batch_size": batch,
        "img_size": meta["img_size"], "steps": len(losses), "final_loss": losses[-1], "val_accuracy": val_accuracy,
        "val_loss": val_loss, "mean_step_seconds": sum(steady_seconds) / len(steady_seconds), "median_step_seconds":
        statistics.median(steady_seconds), "peak_rss_bytes": peak_rss_bytes(), "trainable_blocks": info["trainable_blocks"],
        "classes": meta["class_names"], "artifacts": str(art), "source_run": info.get("source_run"),
    }
    _save_checkpoint(api, state, out / "checkpoint")
    tmp_fd, tmp = tempfile.mkstemp(prefix=".model.onnx.", suffix=".tmp", dir=out)
    os.close(tmp_fd)
    try:
        module.export_model_for_inferencing(tmp, ["logits"])
        proto = onnx.load(tmp)
    finally:
        os.unlink(tmp)
    props = build_metadata(class_names=meta["class_names"], img_size=meta["img_size"], mean=meta["mean"],
                           std=meta["std"], base_model=meta.get("base_model"), profile=meta.get("profile"),
                           summary=summary, interpolation=load.args["interpolation"],
                           crop_pct=load.args["crop_pct"], crop_mode=load.args["crop_mode"])
    set_metadata(proto, props)
    limit_ir_version(proto)
    blob = proto.SerializeToString()
    atomic_write(out / "model.onnx", lambda f: f.write(blob))
    atomic_write_json(out / SUMMARY_FILE, summary)
    emit({"event": "done", "steps": len(losses), "val_accuracy": val_accuracy,
          "mean_step_seconds": summary["mean_step_seconds"], "peak_rss_bytes": summary["peak_rss_bytes"]})
    return summary


def _save_checkpoint(api, state, path: Path) -> None:
    atomic_write_path(path, lambda tmp: api.CheckpointState.save_checkpoint(state, str(tmp)))
