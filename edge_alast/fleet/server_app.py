"""The fleet's Flower ServerApp (Message API): a Flower strategy over the trainable tensors only (weighted FedAvg by
default; FedProx, FedAdam, or a robust aggregator: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan; optionally
inside Flower's fixed-clipping differential-privacy wrapper), with every reply checked first, a checkpoint after
every round, and resume after a server restart.

:class:`FleetStrategy` wraps the Flower strategy; ``Strategy.start`` calls its ``configure_train`` and
``aggregate_train`` once per round. ``aggregate_train`` checks each reply (:func:`edge_alast.fleet.validate.
check_reply`: layout, metrics, decoded dtypes and shapes, finite values, the update's norm bound, clipping, the
FedAvg weight cap), leaves a bad one out of the round, names the node in the log and in the round's record, and
hands the rest to the Flower strategy; an aggregate with a non-finite value is discarded (the global model and
FedAdam's moments stay as they were), so a non-finite model is never evaluated, checkpointed or resumed.

Flower's ``Strategy.start`` counts rounds from 1 and has no "start at round k": a restarted ServerApp loads the
last checkpoint (round, global tensors, history, FedAdam's moments) and runs the missing rounds with their numbers
offset. ``evaluate_fn`` is Flower's after-each-round hook: it evaluates the global model on the held-out folder and
writes the checkpoint. Run with ``flwr run`` on the deployment engine (see docs/fleet.md).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian,
                                     FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy)

from ..atomic import atomic_write_json
from ..errors import ConfigError, EdgeAlastError
from ..methods import METHODS
from .node import record_tensors, weights_checksum
from .server import ERROR_FILE, GlobalModel
from .settings import FleetSettings
from .validate import BadReply, ReplyBounds, check_reply, nonfinite

app = ServerApp()

# strategy name -> (Flower class, its own arguments from the settings); every one also gets the sampling arguments.
_STRATEGIES = {
    "fedavg": (FedAvg, lambda s: {}),
    "fedprox": (FedProx, lambda s: {"proximal_mu": s.proximal_mu}),
    "fedadam": (FedAdam, lambda s: {"eta": s.server_lr, "tau": s.server_tau,  # no lr: the method's default
                                    "eta_l": float(s.train["lr"] or METHODS[s.train["method"]].default_lr)}),
    "fedmedian": (FedMedian, lambda s: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda s: {"beta": s.trim_beta}),
    "krum": (Krum, lambda s: {"num_malicious_nodes": s.malicious_nodes}),
    "multikrum": (MultiKrum, lambda s: {"num_malicious_nodes": s.malicious_nodes,
                                        "num_nodes_to_select": s.krum_select or 1}),
    "bulyan": (Bulyan, lambda s: {"num_malicious_nodes": s.malicious_nodes}),
}
_DP_WRAPPERS = {"server": DifferentialPrivacyServerSideFixedClipping,
                "client": DifferentialPrivacyClientSideFixedClipping}


class FleetError(EdgeAlastError):
    """The server cannot go on (exit code 1)."""


class FleetStrategy(Strategy):
    """A Flower strategy (``inner``) behind the fleet's checks: global round numbers (resume offset), bytes and
    per-node records per round, every reply checked before ``inner`` sees it, and an aggregate with a non-finite
    value discarded."""

    def __init__(self, inner: Strategy, settings: FleetSettings, offset: int = 0):
        self.inner = inner
        self.settings = settings
        self.round_offset = offset
        self.record: dict = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.node_names: dict[int, str] = {}  # node id -> the name its last good reply gave
        self.noise_std: list[dict] = []
        self._sent: list[Message] = []

    @property
    def base(self) -> Strategy:
        """The aggregating Flower strategy (inside a DP wrapper, if any)."""
        return getattr(self.inner, "strategy", self.inner)

    def summary(self) -> None:
        s = self.settings
        log(INFO, "\t├──> edge-alast checks: max-update-norm %s, clip-norm %s, max-examples %s, dp %s",
            s.max_update_norm or "off", s.clip_norm or "off", s.example_cap() or "off", s.dp)
        self.inner.summary()

    # ------------------------------------------------------------------------------------------ train
    def configure_train(self, server_round, arrays, config, grid):
        rnd = server_round + self.round_offset
        self.global_arrays = {name: array.numpy() for name, array in arrays.items()}
        messages = list(self.inner.configure_train(rnd, arrays, config, grid))
        if self.settings.dp != "none":  # the noise is calibrated to the nodes actually sampled this round
            self.inner.num_sampled_clients = max(1, len(messages))
        self._sent = messages  # the Grid sets each message's id when it pushes it: replies point back to it
        self.record = {"round": rnd, "t0": time.time(), "sent": len(messages),
                       "bytes_down": arrays.count_bytes() * len(messages), "record_bytes_down": arrays.count_bytes()}
        return messages

    def aggregate_train(self, server_round, replies):
        rnd = server_round + self.round_offset
        replies = list(replies)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        bounds = self.bounds()
        good, nodes, failed = [], [], []
        for m in replies:
            node_id = dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            if m.has_error():  # raised on the node, or the node died (the SuperLink answers for it, code 5)
                failed.append({"node_id": node_id, "name": self.node_names.get(node_id), "code": int(m.error.code),
                               "reason": str(m.error.reason)[:500]})
                continue
            try:
                checked = check_reply(m.content, bounds, self.global_arrays)
            except BadReply as e:
                failed.append({"node_id": node_id, "name": self.node_names.get(node_id), "code": -1,
                               "rejected": True, "reason": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - a reply no check foresaw costs its node the round, not the run
                failed.append({"node_id": node_id, "name": self.node_names.get(node_id), "code": -1,
                               "rejected": True, "reason": f"could not be checked: {type(e).__name__}: {e}"[:500]})
                continue
            metrics, info = checked.metrics, checked.info
            name = info.get("name") or str(node_id)
            self.node_names[node_id] = name
            bytes_up = m.content["arrays"].count_bytes()
            m.content = checked.content()
            good.append(m)
            nodes.append({"node_id": node_id, "name": name, "profile": info.get("profile") or None,
                          "method": info.get("method"), "device": info.get("device"),
                          "batch_size": info.get("batch-size"), "num_examples": metrics["num-examples"],
                          "weight": checked.weight, "update_norm": checked.update_norm, "checks": checked.notes,
                          "steps": metrics["steps"], "train_loss": metrics["train-loss"],
                          "final_loss": metrics["final-loss"], "peak_rss_bytes": metrics["peak-rss-bytes"],
                          "step_peak_bytes": metrics["step-peak-bytes"], "train_seconds": metrics["train-seconds"],
                          "round_seconds": metrics["round-seconds"], "train_flops": metrics["train-flops"],
                          "bytes_up": bytes_up})
        answered = {m.metadata.reply_to_message_id for m in replies}
        self.record.update(ok=len(good), nodes=nodes, failed=failed,
                           missing=[node for mid, node in dst.items() if mid not in answered],  # round timeout
                           bytes_up=sum(n["bytes_up"] for n in nodes),
                           train_seconds=time.time() - self.record.get("t0", time.time()))
        for f in failed:
            log(WARNING, "[edge-alast] round %s: node %s%s left out%s: %s", rnd, f["node_id"],
                f" ({f['name']})" if f.get("name") else "", " (reply rejected)" if f.get("rejected") else "",
                f["reason"])
        for n in nodes:
            for note in n["checks"]:
                log(WARNING, "[edge-alast] round %s: node %s (%s): %s", rnd, n["node_id"], n["name"], note)
        if not good:
            return self._no_update(rnd, "no usable reply")  # the global model stays as it was
        self._select(len(good))
        before = self.strategy_state()
        try:
            arrays, metrics = self.inner.aggregate_train(rnd, good)
        except (AggregationError, InconsistentMessageReplies, ValueError) as e:
            self.load_strategy_state(before)
            return self._no_update(rnd, f"{type(self.base).__name__} could not aggregate: {e}")
        if arrays is None:  # e.g. Bulyan with fewer than 4f+3 replies
            return self._no_update(rnd, f"{type(self.base).__name__} returned no aggregate from {len(good)} replies")
        bad = nonfinite(arrays)
        if bad:
            self.load_strategy_state(before)
            return self._no_update(rnd, f"the aggregate holds non-finite values in {len(bad)} tensors (e.g. "
                                        f"{bad[0]}); the global model stays as it was")
        if self.settings.dp != "none":
            from flwr.supercore.differential_privacy import compute_stdv

            self.noise_std.append({"round": rnd, "nodes": self.inner.num_sampled_clients, "std": compute_stdv(
                self.inner.noise_multiplier, self.inner.clipping_norm, self.inner.num_sampled_clients)})
        return arrays, metrics

    def _select(self, replies: int) -> None:
        """MultiKrum with krum-select 0 averages the replies minus the assumed malicious ones."""
        if isinstance(self.base, MultiKrum) and not isinstance(self.base, Krum) and not self.settings.krum_select:
            self.base.num_nodes_to_select = max(1, replies - self.settings.malicious_nodes)

    def _no_update(self, rnd: int, reason: str):
        self.record["no_update"] = reason
        log(WARNING, "[edge-alast] round %s: the global model is not updated: %s", rnd, reason)
        return None, None

    def bounds(self) -> ReplyBounds:
        s = self.settings
        return ReplyBounds.of(self.global_arrays, max_update_norm=s.max_update_norm or None,
                              clip_norm=s.clip_norm or None, max_examples=s.example_cap(),
                              uniform_weight=s.dp != "none")

    # ------------------------------------------------------------------------------------------ evaluate (central)
    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    # ------------------------------------------------------------------------------------------ state
    # FedAdam keeps moments between rounds: they are part of the checkpoint.
    def strategy_state(self) -> dict:
        base = self.base
        if not isinstance(base, FedAdam) or base.m_t is None:
            return {}
        return {"m_t": {k: torch.from_numpy(np.array(v)) for k, v in base.m_t.items()},
                "v_t": {k: torch.from_numpy(np.array(v)) for k, v in (base.v_t or {}).items()}}

    def load_strategy_state(self, state: dict) -> None:
        base = self.base
        if isinstance(base, FedAdam):
            base.m_t = {k: v.numpy() for k, v in state["m_t"].items()} if state.get("m_t") else None
            base.v_t = {k: v.numpy() for k, v in state["v_t"].items()} if state.get("v_t") else None


def make_strategy(settings: FleetSettings, offset: int = 0) -> FleetStrategy:
    """The Flower strategy the run config names, inside Flower's DP wrapper when ``dp`` is set, behind the
    fleet's checks."""
    cls, own = _STRATEGIES[settings.strategy]
    inner = cls(fraction_train=settings.fraction_train, fraction_evaluate=0.0,  # the server evaluates centrally
                min_train_nodes=settings.min_train_nodes, min_evaluate_nodes=0,
                min_available_nodes=settings.min_available_nodes, weighted_by_key="num-examples", **own(settings))
    if settings.dp != "none":
        inner = _DP_WRAPPERS[settings.dp](inner, noise_multiplier=settings.dp_noise, clipping_norm=settings.clip_norm,
                                          num_sampled_clients=max(1, settings.min_train_nodes))
    return FleetStrategy(inner, settings, offset)


def trust_summary(settings: FleetSettings, history: list[dict], strategy: FleetStrategy) -> dict:
    """What the server refused and bounded, for summary.json: every rejected reply (round, node, reason), the
    rejections per node, the rounds without an update, and the privacy parameters."""
    rounds = [h for h in history if h.get("round", 0) > 0]
    rejected = [{"round": h["round"], "node_id": f["node_id"], "name": f.get("name"), "reason": f["reason"]}
                for h in rounds for f in h.get("failed", []) if f.get("rejected")]
    strikes = Counter(str(r["name"] or r["node_id"]) for r in rejected)
    privacy = None
    if settings.dp != "none":
        privacy = {"mechanism": f"Gaussian, fixed clipping on the {settings.dp} (Flower "
                                f"{type(strategy.inner).__name__})",
                   "noise_multiplier": settings.dp_noise, "clipping_norm": settings.clip_norm,
                   "weights": "uniform (every node weighs 1)", "noise_std_per_round": strategy.noise_std,
                   "epsilon": None, "epsilon_note": "not accounted: Flower's accountant needs the dp-accounting "
                                                    "package and no-amplification sampling"}
    return {"defence": {"strategy": settings.strategy, "max_update_norm": settings.max_update_norm or None,
                        "clip_norm": settings.clip_norm or None, "max_examples": settings.example_cap(),
                        "trim_beta": settings.trim_beta if settings.strategy == "fedtrimmedavg" else None,
                        "malicious_nodes": settings.malicious_nodes if settings.strategy in (
                            "krum", "multikrum", "bulyan") else None},
            "rejected_replies": rejected, "rejections_per_node": dict(strikes),
            "rounds_without_update": [{"round": h["round"], "reason": h["no_update"]} for h in rounds
                                      if h.get("no_update")],
            "privacy": privacy}


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
        bad = nonfinite({n: t.numpy() for n, t in model.tensors().items()})
        if bad:
            raise ConfigError(f"run config out: the round-{start_round} checkpoint in {settings.out} holds non-finite "
                              f"values ({len(bad)} tensors, e.g. {bad[0]}); it cannot be resumed: use another out")
        resumes.append(start_round)
        log(INFO, "[edge-alast] resuming after round %s from %s", start_round, settings.out)
    strategy = make_strategy(settings, start_round)
    if checkpoint is not None:
        strategy.load_strategy_state(checkpoint.get("strategy") or {})

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = start_round + server_round
        if server_round == 0 and checkpoint is not None:
            return None  # the resumed model was evaluated after its round
        bad = nonfinite(arrays)
        if bad:  # aggregate_train never adopts such a model: reaching this is a bug, and nothing is saved
            raise FleetError(f"round {rnd}: the global model holds non-finite values ({bad[0]}); not evaluated or "
                             "saved")
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
    return model.finish(history, resumes, started, notes, extra=trust_summary(settings, history, strategy))
