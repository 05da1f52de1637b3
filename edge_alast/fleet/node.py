"""One node's round: edge-alast's own trainer (:func:`edge_alast.train`) on the node's local data, starting from the
global model's trainable tensors and the node's own ALaST budgets. flwr-free (the ClientApp is a thin shell around
:func:`train_round`), so a round can be run and tested without Flower.

The node folder (node config ``out``) holds what lives on the node between rounds: ``policy.pt`` (the ALaST policy
state: budgets, importances and the sampler's RNG; budgets are per device, never averaged), ``weights.sha256.json``
(the checksum of its base weights file, cached by size and mtime) and one run folder per round (``round-0003/``,
as ``train`` writes it, without the model file: the node's weights are the server's business).
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..atomic import atomic_write_bytes, atomic_write_json, sha256_file
from ..errors import ConfigError
from ..runfolder import MODEL_FILE
from ..training.trainer import train
from .settings import NodeSettings

POLICY_FILE = "policy.pt"
WEIGHTS_SUM_FILE = "weights.sha256.json"


@dataclass
class RoundResult:
    """What a node sends back: its trained tensors (same names and shapes as it received), the numbers the server
    aggregates and reports (``metrics``: ints and floats), and who it is (``info``: strings)."""

    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    info: dict[str, str]
    summary: dict = field(default_factory=dict)


def train_round(node: NodeSettings, train_keys: Mapping, tensors: Mapping[str, torch.Tensor], server_round: int, *,
                weights_sha256: str | None = None, proximal_mu: float = 0.0,
                on_event: Callable[[dict], None] | None = None) -> RoundResult:
    """Train round ``server_round`` on this node and return its update.

    Args:
        node: The node's settings.
        train_keys: The fleet's shared TrainConfig keys (sent by the server every round).
        tensors: The global model's trainable tensors.
        weights_sha256: The server's base weights checksum; a node with another file refuses (the frozen weights
            never travel, so a different file would average adapters trained on different models).
        proximal_mu: FedProx's mu (0: plain local training): the round's objective adds ``mu/2 * |w - w_global|^2``
            over the trainable tensors (``train``'s ``start``; metric ``loss/proximal``).
        on_event: Receives the trainer's events.

    Raises:
        ConfigError, DataError: as ``edge-alast train`` would (the server records the reason).
    """
    t0 = time.monotonic()
    config = node.round_config(train_keys, server_round)
    if weights_sha256 and config.weights:
        local = weights_checksum(config.weights, Path(node.out))
        if local != weights_sha256:
            raise ConfigError(f"node config weights: {config.weights} (sha256 {local[:12]}...) is not the server's "
                              f"base weights file (sha256 {weights_sha256[:12]}...)")
    node_dir = Path(node.out)
    node_dir.mkdir(parents=True, exist_ok=True)
    policy_key = {"model": config.model, "method": config.method, "img_size": config.img_size,
                  "classes": list(config.classes or [])}
    policy = load_policy(node_dir, policy_key)

    result = train(config, on_event=on_event,
                   start={"trainable": dict(tensors), "policy": policy, "proximal_mu": proximal_mu}, return_state=True)
    if set(result.trainable) != set(tensors):
        extra = sorted(set(result.trainable) ^ set(tensors))
        raise ConfigError(f"node method {config.method} trains other tensors than the fleet sends "
                          f"({len(extra)} differ, e.g. {extra[0]}); check the run's train-config against this node")
    if result.policy_state is not None:
        save_policy(node_dir, policy_key, result.policy_state)
    Path(config.out, MODEL_FILE).unlink(missing_ok=True)  # merged full weights: only the trainable tensors travel

    summary, history = result.summary, result.history
    losses = history["losses"]
    metrics = {
        "num-examples": result.train_images,  # FedAvg's weight: the node's local training images
        "train-loss": sum(losses) / len(losses) if losses else 0.0,
        "final-loss": float(summary.get("final_loss") or 0.0),
        "steps": int(summary.get("steps") or 0),
        "peak-rss-bytes": int(summary.get("train_peak_rss_bytes") or summary.get("peak_rss_bytes") or 0),
        "step-peak-bytes": int(max(history["step_peak_bytes"], default=0)),
        "train-seconds": float(sum(history["step_seconds"])),
        "round-seconds": time.monotonic() - t0,
        "train-flops": float(summary.get("total_train_flops") or 0),
    }
    info = {"name": node.name, "profile": summary.get("profile") or "", "method": config.method,
            "device": summary.get("device") or "", "batch-size": str(summary.get("batch_size") or "")}
    return RoundResult(tensors=result.trainable, metrics=metrics, info=info, summary=summary)


def record_tensors(record) -> dict[str, torch.Tensor]:
    """A Flower ArrayRecord's arrays as tensors of their own (``to_torch_state_dict`` wraps read-only buffers)."""
    return {name: torch.tensor(array.numpy()) for name, array in record.items()}


# -------------------------------------------------------------------------------------------- the node's files
def load_policy(node_dir: Path, key: dict) -> dict | None:
    """The node's ALaST policy state from its previous round, or None (first round, another model or method, or an
    unreadable file: the policy then starts from its initial budgets)."""
    path = node_dir / POLICY_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged file costs the budgets, never the round
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    return saved.get("policy") or None


def save_policy(node_dir: Path, key: dict, state: dict) -> None:
    """Write the policy state atomically (a power cut leaves the previous round's)."""
    if not state:
        return
    buf = io.BytesIO()
    torch.save({"key": key, "policy": state}, buf)
    atomic_write_bytes(node_dir / POLICY_FILE, buf.getvalue())


def weights_checksum(path: str | os.PathLike, cache_dir: Path | None = None) -> str:
    """sha256 of a weights file, cached in ``cache_dir`` by path, size and mtime (hashing 90 MB each round costs
    a second on a Raspberry Pi)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise ConfigError(f"weights: cannot read {path}: {e}") from e
    ident = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = Path(cache_dir) / WEIGHTS_SUM_FILE if cache_dir is not None else None
    if cache is not None:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("file") == ident:
                return saved["sha256"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    digest = sha256_file(path)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"file": ident, "sha256": digest})
    return digest
