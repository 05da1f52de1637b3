"""The fleet's Flower ClientApp (Message API): one training round on the node, :func:`edge_alast.fleet.node.train_round`.

A SuperNode starts one ClientApp process per message, so each round runs in a fresh process and its peak RSS is
the round's own. The node's settings come from its node config (``flower-supernode --node-config``, see
:class:`edge_alast.fleet.settings.NodeSettings`); what to train comes from the server with the global tensors.
When the server runs client-side differential privacy (run config ``dp = "client"``) it sends a clipping norm,
and the reply passes through Flower's ``fixedclipping_mod``, which clips the update on the node before it leaves.
"""
from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .node import record_tensors, train_round
from .settings import Fault, NodeSettings

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, train_message)
    return train_message(msg, context)


def train_message(msg: Message, context: Context) -> Message:
    """Train one round and reply with the trained tensors (in the order they came), metrics and who the node is."""
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    if not node.name:
        node = NodeSettings(**{**node.to_node_config(), "name": f"node-{context.node_id}"})
    sent = record_tensors(msg.content["arrays"])
    server_round = int(config["server-round"])
    result = train_round(node, json.loads(str(config["train-config"])), sent, server_round,
                         weights_sha256=str(config.get("weights-sha256") or "") or None,
                         proximal_mu=float(config.get("proximal-mu", 0.0)))
    tensors, metrics = {name: result.tensors[name] for name in sent}, dict(result.metrics)
    if node.fault:
        tensors, metrics = apply_fault(Fault.parse(node.fault), server_round, sent, tensors, metrics)
    content = RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(metrics),
                          "node": ConfigRecord(result.info)})
    return Message(content=content, reply_to=msg)


def apply_fault(fault: Fault, server_round: int, sent: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                metrics: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Corrupt a reply as ``fault`` says (node config ``fault``; testing the server's checks only)."""
    if not fault.applies(server_round):
        return tensors, metrics
    tensors = {name: t.clone() for name, t in tensors.items()}
    if fault.kind in ("nan", "inf"):
        first = next(iter(tensors))
        tensors[first].view(-1)[0] = float(fault.kind)
    elif fault.kind == "scale":  # the update, not the weights: global + X * (trained - global)
        tensors = {name: sent[name] + fault.value * (t - sent[name]) for name, t in tensors.items()}
    elif fault.kind == "examples":
        metrics = {**metrics, "num-examples": int(fault.value)}
    return tensors, metrics
