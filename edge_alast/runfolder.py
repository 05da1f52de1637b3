"""What a run folder holds, in one place: its file names, its JSON files, ``metrics.jsonl`` (and the metric names
older versions wrote), steady-state timing, and the tuned model's weights.

Torch-free at import: the ONNX Runtime trainer, the report and the benchmarks read run folders where torch may not
be installed. :func:`save_model` and :func:`load_run_model` import torch and timm when called.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .atomic import atomic_write_bytes, atomic_write_path, refuse_link
from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.json"  # {"config": the run's TrainConfig, "resolved": the start event}
SUMMARY_FILE = "summary.json"  # written once the run finished
METRICS_FILE = "metrics.jsonl"  # one JSON object per line: step, eval and other events
MODEL_FILE = "model.safetensors"  # the tuned model's state_dict, for export and eval

# The first steps of a run pay for allocator growth and first-touch pages: up to this many are left out of
# steady-state figures (never more than a fifth of the run).
WARMUP_STEPS = 5

# Metric names the trainer writes now -> the names older versions wrote for the same value. The step plan's keep
# ratios were ``budget/keep_ratio`` until the policy's own budgets were logged beside them as ``budget/raw`` (commit
# 24df884, "One shape for the trainer"), when they became ``plan/keep_ratio``.
METRIC_ALIASES: dict[str, tuple[str, ...]] = {"plan/keep_ratio": ("budget/keep_ratio",)}
# Per-block budgets, most specific first: the ALaST policy's own budgets, else the keep ratios each step's plan used
# (capped by the planner and the guard; equal to the budgets without caps).
BUDGET_METRICS = ("budget/raw", "plan/keep_ratio")


# ---------------------------------------------------------------------------------------------- JSON files
def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file of a run folder.

    Raises:
        ConfigError: naming the file: missing (the folder is not a run folder), unreadable, or not a JSON object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path.parent}: not a run folder ({path.name} missing)") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: cannot read: not a JSON object")
    return data


def read_json_if_any(path: str | os.PathLike) -> dict | None:
    """:func:`read_json`, or None where the file is absent or unreadable (for readers that say what they could not
    use, like the report)."""
    try:
        return read_json(path)
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------- metrics
def metric(record: dict, name: str, default: Any = None) -> Any:
    """``record[name]``, else the value under an older name for it (:data:`METRIC_ALIASES`), else ``default``."""
    for key in (name, *METRIC_ALIASES.get(name, ())):
        if key in record:
            return record[key]
    return default


def budget_metric(records: Sequence[dict]) -> str | None:
    """The first of :data:`BUDGET_METRICS` that ``records`` hold as a per-block list (read with :func:`metric`), or
    None where no line has per-block budgets."""
    return next((name for name in BUDGET_METRICS if any(isinstance(metric(r, name), list) for r in records)), None)


def scan_metrics(path: str | os.PathLike) -> tuple[list[dict], int]:
    """Every JSON object of a ``metrics.jsonl``, in file order, and the number of non-blank lines that were not one
    (a line cut by a power loss). Bytes that are not UTF-8 (a torn write) do not stop the reading.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` when there is none).
    """
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    records, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every JSON object of a ``metrics.jsonl``; a line cut by a power loss is skipped; no file reads as empty."""
    try:
        return scan_metrics(path)[0]
    except FileNotFoundError:
        return []


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop the lines past ``last_step`` (steps a resumed run will take again) and torn lines, atomically."""
    path = Path(path)
    refuse_link(path)  # a planted link is refused (UnsafePathError), its target never read nor replaced
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= last_step]
    atomic_write_bytes(path, "".join(json.dumps(record) + "\n" for record in kept).encode())


def steady(values: Sequence[float]) -> list[float]:
    """``values`` (per step, in order) without the warm-up steps."""
    warm = min(WARMUP_STEPS, len(values) // 5)
    return list(values[warm:] or values)


# ---------------------------------------------------------------------------------------------- the tuned model
def save_model(model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``RUN_DIR/model.safetensors`` atomically, the free space checked first
    (DiskFullError naming the bytes needed and free)."""
    import safetensors.torch

    from . import __version__

    # save_model writes straight from the parameters (it handles shared tensors itself): no copy of the weights
    # in memory, which would raise the run's peak RSS on a small device.
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return atomic_write_path(Path(run_dir) / MODEL_FILE, lambda tmp: safetensors.torch.save_model(
        model, str(tmp), metadata={"format": "pt", "edge_alast_version": __version__}), needed=needed,
        what="model weights")


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
    from .adapters.lightpeft import apply_pruning, structure_from_state_dict
    from .data.images import LEGACY_CROP
    from .model.build import create_model, data_config, read_state_dict

    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE).get("config", {})
    summary = read_json(run_dir / SUMMARY_FILE)
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
