"""The fleet's Flower ServerApp (Message API): FedAvg weighted by each node's training images (FedProx or FedAdam
as options) over the trainable tensors only, a checkpoint after every round, resume after a server restart.

Flower's ``Strategy.start`` counts rounds from 1 and has no "start at round k": a restarted ServerApp loads the
last checkpoint (round, global tensors, history, FedAdam's moments) and runs the missing rounds with their numbers
offset (:class:`_Fleet`). ``evaluate_fn`` is Flower's after-each-round hook: it evaluates the global model on the
held-out folder and writes the checkpoint. Run with ``flwr run`` on the deployment engine (see README, "Fleets").
"""
from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from ..atomic import atomic_write_json
from ..methods import METHODS
from ..errors import EdgeAlastError
from .node import record_tensors, weights_checksum
from .server import ERROR_FILE, GlobalModel
from .settings import FleetSettings

app = ServerApp()


class _Fleet:
    """Mixed into a Flower strategy: global round numbers (resume offset), bytes and per-node records per round,
    and replies that cannot be averaged (other tensor names or shapes) left out and named instead of failing the
    round."""

    def setup_fleet(self, offset: int, names_shapes: dict[str, tuple[int, ...]]) -> None:
        self.round_offset = offset
        self.names_shapes = names_shapes
        self.record: dict = {}

    def configure_train(self, server_round, arrays, config, grid):
        rnd = server_round + self.round_offset
        messages = list(super().configure_train(rnd, arrays, config, grid))
        self._sent = messages  # the Grid sets each message's id when it pushes it: replies point back to it
        self.record = {"round": rnd, "t0": time.time(), "sent": len(messages),
                       "bytes_down": arrays.count_bytes() * len(messages), "record_bytes_down": arrays.count_bytes()}
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in getattr(self, "_sent", [])}
        good, nodes, failed = [], [], []
        for m in replies:
            node_id = dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            if m.has_error():  # raised on the node, or the node died (the SuperLink answers for it, code 5)
                failed.append({"node_id": node_id, "code": int(m.error.code), "reason": str(m.error.reason)[:500]})
                continue
            reason = self._unusable(m)
            if reason:
                failed.append({"node_id": node_id, "code": -1, "reason": reason})
                continue
            good.append(m)
            metrics = m.content["metrics"]
            info = m.content["node"] if "node" in m.content else {}
            nodes.append({"node_id": node_id, "name": str(info.get("name") or node_id),
                          "profile": info.get("profile") or None, "method": info.get("method"),
                          "device": info.get("device"), "batch_size": info.get("batch-size"),
                          "num_examples": int(metrics["num-examples"]), "steps": int(metrics["steps"]),
                          "train_loss": float(metrics["train-loss"]), "final_loss": float(metrics["final-loss"]),
                          "peak_rss_bytes": int(metrics["peak-rss-bytes"]),
                          "step_peak_bytes": int(metrics["step-peak-bytes"]),
                          "train_seconds": float(metrics["train-seconds"]),
                          "round_seconds": float(metrics["round-seconds"]),
                          "train_flops": float(metrics["train-flops"]),
                          "bytes_up": m.content["arrays"].count_bytes()})
        answered = {m.metadata.reply_to_message_id for m in replies}
        self.record.update(ok=len(good), nodes=nodes, failed=failed,
                           missing=[node for mid, node in dst.items() if mid not in answered],  # round timeout
                           bytes_up=sum(n["bytes_up"] for n in nodes),
                           train_seconds=time.time() - self.record.get("t0", time.time()))
        for f in failed:
            log(WARNING, "[edge-alast] round %s: node %s left out: %s", self.record["round"], f["node_id"],
                f["reason"])
        if not good:
            return None, None  # nothing to average: the global model stays as it was
        return super().aggregate_train(server_round + self.round_offset, good)

    def _unusable(self, message: Message) -> str | None:
        content = message.content
        if "arrays" not in content or "metrics" not in content:
            return "reply without arrays or metrics"
        arrays = content["arrays"]
        if set(arrays) != set(self.names_shapes):
            return f"reply tensors differ from the global model's ({len(set(arrays) ^ set(self.names_shapes))} names)"
        for name, array in arrays.items():
            if tuple(array.shape) != self.names_shapes[name]:
                return f"{name}: shape {tuple(array.shape)}, the global model's is {self.names_shapes[name]}"
        if int(content["metrics"].get("num-examples", 0)) < 1:
            return "no training images"
        return None

    # FedAdam keeps moments between rounds: they are part of the checkpoint.
    def strategy_state(self) -> dict:
        if not isinstance(self, FedAdam) or self.m_t is None:
            return {}
        return {"m_t": {k: torch.from_numpy(np.asarray(v)) for k, v in self.m_t.items()},
                "v_t": {k: torch.from_numpy(np.asarray(v)) for k, v in (self.v_t or {}).items()}}

    def load_strategy_state(self, state: dict) -> None:
        if isinstance(self, FedAdam) and state.get("m_t"):
            self.m_t = {k: v.numpy() for k, v in state["m_t"].items()}
            self.v_t = {k: v.numpy() for k, v in state["v_t"].items()}


class FleetFedAvg(_Fleet, FedAvg):
    pass


class FleetFedProx(_Fleet, FedProx):
    pass


class FleetFedAdam(_Fleet, FedAdam):
    pass


def make_strategy(settings: FleetSettings):
    common = dict(fraction_train=settings.fraction_train, fraction_evaluate=0.0,  # the server evaluates centrally
                  min_train_nodes=settings.min_train_nodes, min_evaluate_nodes=0,
                  min_available_nodes=settings.min_available_nodes, weighted_by_key="num-examples")
    if settings.strategy == "fedprox":
        return FleetFedProx(proximal_mu=settings.proximal_mu, **common)
    if settings.strategy == "fedadam":
        eta_l = settings.train["lr"] or METHODS[settings.train["method"]].default_lr
        return FleetFedAdam(eta=settings.server_lr, eta_l=float(eta_l), tau=settings.server_tau,
                            **common)
    return FleetFedAvg(**common)


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config.get("out", "")))
    try:
        run_server(grid, FleetSettings.from_run_config(context.run_config))
    except EdgeAlastError as e:  # the reason, for `edge-alast fleet local` and whoever reads the server folder
        if out.is_absolute():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / ERROR_FILE, {"message": str(e), "exit_code": e.exit_code})
        raise


def run_server(grid: Grid, settings: FleetSettings) -> dict:
    """Run (or resume) the federation and write the server folder; returns the summary."""
    started = time.time()
    Path(settings.out, ERROR_FILE).unlink(missing_ok=True)
    model = GlobalModel(settings)
    checkpoint, notes = model.load_last_round()
    history: list[dict] = list(checkpoint["history"]) if checkpoint else []
    resumes: list[int] = list(checkpoint["resumes"]) if checkpoint else []
    start_round = int(checkpoint["round"]) if checkpoint else 0
    if checkpoint is not None:
        resumes.append(start_round)
        log(INFO, "[edge-alast] resuming after round %s from %s", start_round, settings.out)
    strategy = make_strategy(settings)
    strategy.setup_fleet(start_round, {n: tuple(t.shape) for n, t in model.tensors().items()})
    if checkpoint is not None:
        strategy.load_strategy_state(checkpoint.get("strategy") or {})

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = start_round + server_round
        if server_round == 0 and checkpoint is not None:
            return None  # the resumed model was evaluated after its round
        t0 = time.time()
        model.load(record_tensors(arrays))
        accuracy, loss = model.evaluate()
        entry = {"round": rnd, "val_accuracy": accuracy, "val_loss": loss, "eval_seconds": time.time() - t0}
        if server_round > 0:
            record = dict(strategy.record)
            entry.update({k: v for k, v in record.items() if k != "t0"})
            entry["round_seconds"] = time.time() - record.get("t0", t0)
        history.append(entry)
        if server_round > 0:  # a finished round: checkpoint before anything else can fail
            model.save_round(rnd, history, strategy.strategy_state(), resumes)
        log(INFO, "[edge-alast] round %s: %s", rnd, json.dumps({k: entry.get(k) for k in (
            "val_accuracy", "ok", "bytes_up", "bytes_down") if k in entry}))
        return MetricRecord({"val-accuracy": float(accuracy or 0.0), "val-loss": float(loss or 0.0)})

    remaining = settings.num_rounds - start_round
    if remaining > 0:
        train_keys = {**settings.train, "classes": model.classes}
        config = ConfigRecord({"train-config": json.dumps(train_keys),
                               "weights-sha256": weights_checksum(settings.train["weights"], Path(settings.out))})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.tensors()), num_rounds=remaining,
                       timeout=settings.round_timeout, train_config=config, evaluate_fn=evaluate_fn)
    else:
        log(INFO, "[edge-alast] all %s rounds were done before; writing the run folder", settings.num_rounds)
    return model.finish(history, resumes, started, notes)
