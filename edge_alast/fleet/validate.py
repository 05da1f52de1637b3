"""What the server accepts from a node: every training reply is checked before it can reach an aggregator.

A reply is a Flower ``RecordDict`` that arrived over the network: its records, metric values, array headers and
array bytes are all the node's word. :func:`check_reply` decodes it against the global model and either returns
a :class:`CheckedReply` (the decoded update, its L2 norm, the FedAvg weight after the cap, clipped if asked) or
raises :class:`BadReply` with the reason; the server leaves a bad reply out of the round, names the node and counts
it against it (see :mod:`edge_alast.fleet.server_app`). Checked, in order:

- layout: exactly the records ``arrays`` (ArrayRecord), ``metrics`` (MetricRecord) and ``node`` (ConfigRecord), and
  exactly the metric keys of :data:`REPLY_METRICS` (a missing or an extra key used to stop Flower's aggregation);
- metrics: one finite, non-negative scalar each, integers where :data:`REPLY_METRICS` says so;
- arrays: the global model's names; each header's dtype and shape the global tensor's; the payload no larger than
  such an array; the *decoded* array's dtype and shape again (a header can lie); every value finite;
- the update (tensors minus the global ones) not exactly zero (nothing trained), its L2 norm at most
  ``max_update_norm``; clipped to ``clip_norm`` (Flower's ``compute_clip_model_update``);
- ``num-examples`` >= 1, and the FedAvg weight capped at ``max_examples`` (what a node can train in a round).

After aggregation, :func:`nonfinite` guards the other side: a global model with a non-finite value is never
adopted, evaluated or saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# The reply a node's ClientApp sends (edge_alast.fleet.client_app): record name -> record type.
REPLY_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "node": ConfigRecord}
# The node's metrics (edge_alast.fleet.node.train_round): name -> int (a count) or float.
REPLY_METRICS: dict[str, type] = {
    "num-examples": int, "train-loss": float, "final-loss": float, "steps": int, "peak-rss-bytes": int,
    "step-peak-bytes": int, "train-seconds": float, "round-seconds": float, "train-flops": float,
}
WEIGHT_KEY = "num-examples"
MAX_INFO_CHARS = 200  # node-reported strings (name, profile, ...) are cut to this before they reach logs
NPY_HEADER_SLACK = 4096  # bytes an .npy header may take beyond the array's own


class BadReply(ValueError):
    """A reply the server cannot use; the message is the reason (it goes to the log and the summary)."""


@dataclass(frozen=True)
class ReplyBounds:
    """What a reply must match and what bounds it.

    Attributes:
        tensors: The global model's trainable tensors: name -> (shape, numpy dtype name).
        max_update_norm: Largest accepted L2 norm of an update; None: no bound.
        clip_norm: Updates are scaled down to this L2 norm; None: no clipping.
        max_examples: Largest FedAvg weight one reply may carry; None: no cap.
        uniform_weight: Every reply weighs 1 (differential privacy: the noise is calibrated to one node's update).
    """

    tensors: dict[str, tuple[tuple[int, ...], str]]
    max_update_norm: float | None = None
    clip_norm: float | None = None
    max_examples: int | None = None
    uniform_weight: bool = False

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray], **bounds) -> "ReplyBounds":
        return cls(tensors={n: (tuple(a.shape), str(a.dtype)) for n, a in arrays.items()}, **bounds)


@dataclass
class CheckedReply:
    """A reply that passed :func:`check_reply`."""

    arrays: dict[str, np.ndarray]  # the node's tensors (after clipping), in the global model's order
    metrics: dict[str, int | float]
    info: dict[str, str]
    update_norm: float  # before clipping
    weight: int | float  # the FedAvg weight after the cap
    notes: list[str] = field(default_factory=list)  # what was changed: clipped, weight capped

    def content(self) -> RecordDict:
        """What the aggregator sees: the checked arrays and metrics, the weight in ``num-examples``."""
        metrics = {**self.metrics, WEIGHT_KEY: self.weight}
        return RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in self.arrays.items()}),
                           "metrics": MetricRecord(metrics)})


def check_reply(content: RecordDict, bounds: ReplyBounds, global_arrays: Mapping[str, np.ndarray]) -> CheckedReply:
    """Decode and check one training reply against the global tensors it was trained from.

    Raises:
        BadReply: the first thing wrong with it.
    """
    _check_layout(content)
    metrics = _check_metrics(content["metrics"])
    info = {str(k)[:40]: str(v)[:MAX_INFO_CHARS] for k, v in content["node"].items()}
    arrays = _decode_arrays(content["arrays"], bounds)

    names = list(bounds.tensors)
    updates = [arrays[n].astype(np.float64) - global_arrays[n].astype(np.float64) for n in names]
    norm = math.sqrt(sum(float(np.vdot(u, u)) for u in updates))
    if not math.isfinite(norm):
        raise BadReply("the update's L2 norm overflows")
    if norm == 0.0:  # a free rider; also Flower's FlatClip divides by this norm
        raise BadReply("the update is exactly zero: the global tensors came back unchanged, nothing trained")
    if bounds.max_update_norm and norm > bounds.max_update_norm:
        raise BadReply(f"update L2 norm {norm:.4g} exceeds max-update-norm {bounds.max_update_norm:g}")
    notes = []
    if bounds.clip_norm and norm > bounds.clip_norm:
        from flwr.supercore.differential_privacy import compute_clip_model_update

        params = [arrays[n] for n in names]
        compute_clip_model_update(params, [global_arrays[n] for n in names], bounds.clip_norm)
        arrays = {n: np.asarray(p, dtype=bounds.tensors[n][1]) for n, p in zip(names, params)}
        notes.append(f"update clipped from L2 norm {norm:.4g} to {bounds.clip_norm:g}")

    examples = metrics[WEIGHT_KEY]
    if examples < 1:
        raise BadReply(f"{WEIGHT_KEY} {examples}: no training images")
    weight = examples
    if bounds.uniform_weight:
        weight = 1
    elif bounds.max_examples and examples > bounds.max_examples:
        weight = bounds.max_examples
        notes.append(f"{WEIGHT_KEY} {examples} capped to {weight}")
    return CheckedReply(arrays={n: arrays[n] for n in names}, metrics=metrics, info=info, update_norm=norm,
                        weight=weight, notes=notes)


def nonfinite(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (decoding errors count as non-finite)."""
    bad = []
    for name, array in arrays.items():
        try:
            values = array.numpy() if isinstance(array, Array) else np.asarray(array)
            if values.dtype.kind not in "fc" or not np.isfinite(values).all():
                bad.append(name)
        except (ValueError, TypeError):
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------- the checks
def _check_layout(content: RecordDict) -> None:
    names = set(content.keys())
    if names != set(REPLY_RECORDS):
        missing, extra = sorted(set(REPLY_RECORDS) - names), sorted(names - set(REPLY_RECORDS))
        raise BadReply("reply records differ from arrays, metrics, node"
                       + (f": missing {', '.join(missing)}" if missing else "")
                       + (f"; unexpected {', '.join(_short(e) for e in extra)}" if extra else ""))
    for name, kind in REPLY_RECORDS.items():
        if not isinstance(content[name], kind):
            raise BadReply(f"reply record {name}: a {type(content[name]).__name__}, expected a {kind.__name__}")


def _check_metrics(record: MetricRecord) -> dict[str, int | float]:
    keys = set(record.keys())
    if keys != set(REPLY_METRICS):
        missing, extra = sorted(set(REPLY_METRICS) - keys), sorted(keys - set(REPLY_METRICS))
        raise BadReply("metrics differ from the node's"
                       + (f": missing {', '.join(missing)}" if missing else "")
                       + (f"; unexpected {', '.join(_short(e) for e in extra)}" if extra else ""))
    metrics: dict[str, int | float] = {}
    for key, kind in REPLY_METRICS.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadReply(f"metric {key}: {_short(repr(value))} is not a number")
        if not math.isfinite(value) or value < 0:
            raise BadReply(f"metric {key}: {value!r} is not a finite number >= 0")
        if kind is int:
            if float(value) != int(value):
                raise BadReply(f"metric {key}: {value!r} is not a whole number")
            value = int(value)
        metrics[key] = value
    return metrics


def _decode_arrays(record: ArrayRecord, bounds: ReplyBounds) -> dict[str, np.ndarray]:
    names = set(record.keys())
    if names != set(bounds.tensors):
        differ = sorted(names ^ set(bounds.tensors))
        raise BadReply(f"tensor names differ from the global model's ({len(differ)} differ, e.g. "
                       f"{_short(differ[0])})")
    arrays = {}
    for name, (shape, dtype) in bounds.tensors.items():
        array = record[name]
        if str(array.dtype) != dtype or tuple(array.shape) != shape:
            raise BadReply(f"{name}: header says {_short(str(array.dtype))} {tuple(array.shape)}, the global "
                           f"tensor is {dtype} {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if len(array.data) > expected + NPY_HEADER_SLACK:
            raise BadReply(f"{name}: {len(array.data)} bytes for a {dtype} {shape} tensor of {expected} bytes")
        try:
            values = array.numpy()
        except (ValueError, TypeError, OSError, EOFError) as e:
            raise BadReply(f"{name}: cannot be decoded: {_short(str(e))}") from None
        if str(values.dtype) != dtype or tuple(values.shape) != shape:
            raise BadReply(f"{name}: decodes to {_short(str(values.dtype))} {tuple(values.shape)}, its header "
                           f"and the global tensor say {dtype} {shape}")
        if not np.isfinite(values).all():
            raise BadReply(f"{name}: holds {int((~np.isfinite(values)).sum())} non-finite values")
        arrays[name] = values
    return arrays


def _short(text: str, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."
