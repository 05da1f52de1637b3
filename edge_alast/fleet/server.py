"""The fleet's server side without Flower: the global model (built as every node builds it, by
:func:`edge_alast.training.run.setup_run`), its evaluation on the held-out folder, the per-round checkpoint, and the run folder
it leaves after the last round (what ``edge-alast train`` leaves: ``model.safetensors`` with LoRA merged,
``config.json``, ``summary.json``, ``model.onnx`` + ``manifest.json``).

Server folder (run config ``out``)::

    checkpoints/checkpoint-<round>.pt (+ .sha256)   global trainable tensors, round, history, strategy state
    rounds.jsonl                                    one line per round: accuracy, bytes, every node's figures
    summary.json, config.json, model.safetensors, model.onnx, manifest.json   after the last round
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_write, atomic_write_json
from ..training.checkpoint import load_latest, save_checkpoint
from ..errors import ConfigError
from ..adapters.lora import merge_lora
from ..device.precision import autocast
from ..model.trainable import load_trainable
from ..training.run import setup_run
from ..training.evaluate import evaluate
from ..runfolder import save_model
from .settings import FleetSettings

CHECKPOINT_DIR = "checkpoints"
ROUNDS_FILE = "rounds.jsonl"
ERROR_FILE = "fleet-error.json"  # why the ServerApp stopped, for `fleet local` and whoever reads the folder
CHECKPOINT_FORMAT = 1


class GlobalModel:
    """The global model: the shared TrainConfig's model with the run's base weights, whose trainable tensors the
    rounds replace. ``tensors()`` is what the server sends; only those tensors ever change."""

    def __init__(self, settings: FleetSettings):
        self.settings = settings
        self.config = settings.train_config(data=settings.val_data, val_data=settings.val_data, out=settings.out,
                                            export=False)
        self.run = setup_run(self.config)
        self.names = [n for n, _ in self.run.trainable.parameters(self.run.model)]

    @property
    def classes(self) -> list[str]:
        return list(self.run.classes)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.run.trainable.parameters(self.run.model)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace every trainable tensor (ConfigError naming the first that does not fit)."""
        load_trainable(self.run.model, self.run.trainable, tensors, source="global tensors", complete=True)

    def evaluate(self) -> tuple[float | None, float | None]:
        """Accuracy and loss on the held-out folder, every token (as ``train``'s final evaluation), on at most
        run config ``eval-images`` of its images (default: all)."""
        run = self.run
        return evaluate(run.model, run.final_eval_samples, run.preprocess, run.eval_batch_size, run.device,
                        autocast(run.device, run.precision), bad=run.val_bad_images)

    def payload_facts(self) -> dict[str, int]:
        """How large what travels is, against the whole model."""
        params = dict(self.run.trainable.parameters(self.run.model))
        return {"tensors": len(params), "params": sum(p.numel() for p in params.values()),
                "tensor_bytes": sum(p.numel() * p.element_size() for p in params.values()),
                "model_params": sum(p.numel() for p in self.run.model.parameters()),
                "model_bytes": sum(p.numel() * p.element_size() for p in self.run.model.parameters())}

    # ------------------------------------------------------------------------------------------ checkpoints
    def resume_key(self) -> dict[str, Any]:
        return {"train": self.config.resume_key(), "strategy": self.settings.strategy}

    def save_round(self, server_round: int, history: list[dict], strategy_state: dict, resumes: list[int]) -> Path:
        """Checkpoint the global tensors after ``server_round`` (atomic, sha256-verified; newest two kept)."""
        state = {"format": CHECKPOINT_FORMAT, "round": server_round, "tensors": self.tensors(), "history": history,
                 "strategy": strategy_state, "resumes": resumes, "key": self.resume_key()}
        folder = Path(self.settings.out) / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(folder, server_round, state, key=self.run.device_key)
        lines = "".join(json.dumps(entry) + "\n" for entry in history)
        atomic_write(Path(self.settings.out) / ROUNDS_FILE, lambda f: f.write(lines.encode()))
        return path

    def load_last_round(self) -> tuple[dict | None, list[str]]:
        """The newest verified checkpoint (loaded into the model), or None; refuses one of other settings."""
        state, notes = load_latest(Path(self.settings.out) / CHECKPOINT_DIR, self.run.device_key)
        if state is None:
            return None, notes
        old = state.get("key", {})
        # settings the checkpoint predates count as their defaults, as for train's own checkpoints
        differs = self.config.resume_differs(old.get("train", {}))
        if old.get("strategy") != self.settings.strategy:
            differs.append("strategy")
        if differs:
            raise ConfigError(f"run config out: {self.settings.out} holds the checkpoint of a fleet with other "
                              f"settings ({', '.join(differs)}); use another out, or the same settings to resume")
        self.load(state["tensors"])
        return state, notes

    # ------------------------------------------------------------------------------------------ the run folder
    def finish(self, history: list[dict], resumes: list[int], started: float, notes: list[str],
               extra: dict | None = None) -> dict:
        """Write the run folder after the last round; returns the summary (``extra``: the ServerApp's own keys)."""
        run, out = self.run, Path(self.settings.out)
        last = history[-1] if history else {}
        payload = self.payload_facts()
        merge_lora(run.model)  # adapters folded in: the saved and exported model is timm's architecture
        save_model(run.model, out)
        settings = self.settings
        atomic_write_json(out / "config.json", {
            "config": self.config.to_dict(),
            "resolved": {"method": self.config.method, "model": self.config.model, "classes": self.classes,
                         "device": run.device, "precision": run.precision, "run_dir": str(out)},
            "fleet": {k: v for k, v in vars(settings).items() if k != "train"}})
        summary = fleet_summary(settings, history, payload, resumes, notes)
        summary.update({
            "edge_alast_version": __version__, "fleet": True, "method": self.config.method,
            "model": self.config.model, "profile": None, "device": run.device, "precision": run.precision,
            "img_size": self.config.img_size, "eval_transform": run.preprocess.eval_transform,
            "classes": self.classes, "val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"),
            "val_images": len(run.final_eval_samples), "trainable_params": payload["params"],
            "base_params": sum(p.numel() for p in run.model.parameters()),
            "server_seconds": time.time() - started, "warnings": run.warnings, **(extra or {}),
        })
        atomic_write_json(out / "summary.json", summary)
        if settings.export:
            from ..deploy.export import export_run

            manifest = export_run(out)
            summary["onnx"] = {"file": manifest["file"], "sha256": manifest["sha256"],
                               "size_bytes": manifest["size_bytes"], "parity": manifest["parity"]}
            atomic_write_json(out / "summary.json", summary)
        return summary


def fleet_summary(settings: FleetSettings, history: list[dict], payload: dict, resumes: list[int],
                  notes: list[str]) -> dict:
    """The fleet's own figures: accuracy after each round, bytes per round, each node's peak RSS (the per-node
    details of every round are in rounds.jsonl; the summary also travels in the ONNX metadata, so it stays small)."""
    rounds = [h for h in history if h["round"] > 0]
    peaks: dict[str, int] = {}
    for entry in rounds:
        for node in entry.get("nodes", []):
            name = node.get("name") or str(node.get("node_id"))
            peaks[name] = max(peaks.get(name, 0), int(node.get("peak_rss_bytes") or 0))
    return {
        "strategy": settings.strategy, "num_rounds": settings.num_rounds, "rounds_completed": len(rounds),
        "steps_per_round": settings.train.get("steps"),
        "steps": sum(n.get("steps", 0) for h in rounds for n in h.get("nodes", [])),
        "val_accuracy_per_round": [{"round": h["round"], "val_accuracy": h.get("val_accuracy"),
                                    "val_loss": h.get("val_loss")} for h in history],
        "bytes_per_round": [{"round": h["round"], "down": h.get("bytes_down", 0), "up": h.get("bytes_up", 0)}
                            for h in rounds],
        "bytes_total": {"down": sum(h.get("bytes_down", 0) for h in rounds),
                        "up": sum(h.get("bytes_up", 0) for h in rounds)},
        "payload": payload, "node_peak_rss_bytes": peaks,
        "nodes_per_round": [{"round": h["round"], "sent": h.get("sent"), "ok": h.get("ok"),
                             "nodes": [n.get("name") for n in h.get("nodes", [])],
                             "left_out": [f["node_id"] for f in h.get("failed", [])] + list(h.get("missing", []))}
                            for h in rounds],
        "resumed_after_round": resumes, "checkpoint_notes": notes,
    }
