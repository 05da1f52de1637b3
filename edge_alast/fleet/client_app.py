"""The fleet's Flower ClientApp (Message API): one training round on the node, :func:`edge_alast.fleet.node.train_round`.

A SuperNode starts one ClientApp process per message, so each round runs in a fresh process and its peak RSS is
the round's own. The node's settings come from its node config (``flower-supernode --node-config``, see
:class:`edge_alast.fleet.settings.NodeSettings`); what to train comes from the server with the global tensors.
"""
from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .node import record_tensors, train_round
from .settings import NodeSettings

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = NodeSettings.from_node_config(context.node_config)
    config = msg.content["config"]
    if not node.name:
        node = NodeSettings(**{**node.to_node_config(), "name": f"node-{context.node_id}"})
    result = train_round(node, json.loads(str(config["train-config"])), record_tensors(msg.content["arrays"]),
                         int(config["server-round"]), weights_sha256=str(config.get("weights-sha256") or "") or None,
                         proximal_mu=float(config.get("proximal-mu", 0.0)))
    content = RecordDict({"arrays": ArrayRecord(result.tensors), "metrics": MetricRecord(result.metrics),
                          "node": ConfigRecord(result.info)})
    return Message(content=content, reply_to=msg)
