"""Fleets on Flower: settings, partitions, a node's round and its payload in-process; then real loopback
federations (a Flower SuperLink and SuperNodes as processes on 127.0.0.1): 2 nodes x 2 rounds, a node killed
mid-round (and restarted: it rejoins), the server killed and resumed. Every process a test starts is stopped by the
test, also on failure (LocalFleet is a context manager; the CLI stops its own).

The process tests cost tens of seconds each (marked ``fleet``); the node-kill test waits for Flower's heartbeat
(a dead node's message is answered with an error ~50 s after the kill; no round timeout is needed, so a slow but
live node is never cut off).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.helpers import TINY_ARGS, make_image_folder

if os.environ.get("EDGE_ALAST_REQUIRE_ASSETS") != "1":  # in CI (make test installs the test extra) it must run
    pytest.importorskip("flwr", reason="pip install 'edge-alast[fleet]'")

from edge_alast.cli.main import main  # noqa: E402
from edge_alast.errors import ConfigError  # noqa: E402
from edge_alast.fleet.node import POLICY_FILE, load_policy, train_round  # noqa: E402
from edge_alast.fleet.partition import parse_partition, split_indices, write_partitions  # noqa: E402
from edge_alast.fleet.settings import RUN_CONFIG, FleetSettings, NodeSettings, write_app  # noqa: E402

CLASSES = ("a", "b", "c")
RUN_TIMEOUT = 420  # seconds: a hung federation fails the test instead of hanging the suite


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny base weights (the frozen part every node builds from) and train/val image folders."""
    from safetensors.torch import save_file

    from edge_alast.model.build import create_model

    root = tmp_path_factory.mktemp("fleet-assets")
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=len(CLASSES), img_size=32, **TINY_ARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    make_image_folder(root / "train", classes=CLASSES, per_class=12, seed=1)
    make_image_folder(root / "val", classes=CLASSES, per_class=4, seed=2)
    return root


def run_config(assets, out, **kw) -> dict:
    base = {"out": str(out), "val-data": str(assets / "val"), "weights": str(assets / "tiny.safetensors"),
            "model": "vit_tiny_patch16_224", "img-size": 32, "batch-size": 4, "lr": 1e-3, "steps-per-round": 2,
            "method": "alast-lora", "train-config": json.dumps({"model_args": TINY_ARGS, "lora": {"r": 2}})}
    base.update(kw)
    return base


def train_file(tmp_path, assets, out, **extra) -> Path:
    """A `fleet local --config` run file for the tiny model (model_args cannot be given as flags)."""
    cfg = dict(data=str(assets / "train"), val_data=str(assets / "val"), out=str(out), model="vit_tiny_patch16_224",
               model_args=TINY_ARGS, weights=str(assets / "tiny.safetensors"), img_size=32, steps=2, batch_size=4,
               lr=1e-3, method="alast-lora", lora={"r": 2})
    cfg.update(extra)
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_rounds(out: Path) -> list[dict]:
    """The server's rounds.jsonl: round 0 (the starting model), then one line per finished round."""
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def leftover_processes(out: Path) -> list[int]:
    """Processes still running with this fleet's Flower home (every Flower process of it has FLWR_HOME set)."""
    import psutil

    home, found = str(out / "flwr-home"), []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FLWR_HOME") == home and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


# ---------------------------------------------------------------------------------------------- settings
def test_run_config_refuses_light_peft_and_missing_weights(assets, tmp_path):
    with pytest.raises(ConfigError, match="cannot run in a fleet"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", method="light-peft"))
    with pytest.raises(ConfigError, match="base weights file"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", weights=""))
    with pytest.raises(ConfigError, match="unknown keys"):
        FleetSettings.from_run_config({**run_config(assets, tmp_path / "s"), "rounds": 3})
    with pytest.raises(ConfigError, match="set by the fleet"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", **{"train-config": '{"profile": "x"}'}))
    with pytest.raises(ConfigError, match="cannot run in a fleet"):
        NodeSettings.from_node_config({"data": "d", "out": "o", "method": "light-peft+alast"})
    result = CliRunner().invoke(main, ["fleet", "local", "--nodes", "2", "--rounds", "1", "--config",
                                       str(train_file(tmp_path, assets, tmp_path / "lp", method="light-peft"))])
    assert result.exit_code == 2 and "cannot run in a fleet" in result.output


def test_node_method_may_only_add_or_drop_alast(assets, tmp_path):
    train = FleetSettings.from_run_config(run_config(assets, tmp_path / "s", method="lora")).train
    node = NodeSettings(data="d", out=str(tmp_path / "n"), method="alast-lora", steps=5)
    config = node.round_config(train, 3)
    assert config.method == "alast-lora" and config.steps == 5 and config.seed == 3
    assert config.out.endswith("round-0003") and config.val_data is None and not config.export
    with pytest.raises(ConfigError, match="other tensors"):
        NodeSettings(data="d", out="o", method="alast").round_config(train, 1)


def test_app_pyproject_names_installed_components_and_every_run_config_key(tmp_path):
    import tomli

    app = tomli.loads(write_app(tmp_path / "app").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "edge_alast.fleet.server_app:app",
                                 "clientapp": "edge_alast.fleet.client_app:app"}
    assert set(app["config"]) == set(RUN_CONFIG)


def test_partitions_are_seeded_cover_every_image_and_dirichlet_skews():
    labels = [c for c in range(10) for _ in range(50)]
    assert parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
    with pytest.raises(ConfigError):
        parse_partition("dirichlet:-1")
    iid = split_indices(labels, 4, "iid", None, seed=0)
    dirichlet = split_indices(labels, 4, "dirichlet", 0.5, seed=0, min_size=16)
    assert dirichlet == split_indices(labels, 4, "dirichlet", 0.5, seed=0, min_size=16)
    for parts in (iid, dirichlet):
        assert sorted(i for p in parts for i in p) == list(range(500))
    assert {len(p) for p in iid} == {125} and min(len(p) for p in dirichlet) >= 16

    def class_share_spread(parts):  # how far the nodes' class mixes are from the global one
        return np.mean([np.abs(np.bincount([labels[i] for i in p], minlength=10) / len(p) - 0.1).sum()
                        for p in parts])
    assert class_share_spread(dirichlet) > 2 * class_share_spread(iid)


def test_write_partitions_links_images(assets, tmp_path):
    record = write_partitions(assets / "train", tmp_path / "nodes", 2, "dirichlet:0.5", seed=0, min_size=4)
    assert sum(n["images"] for n in record["nodes"]) == 36 and record["classes"] == list(CLASSES)
    files = list((tmp_path / "nodes" / "node0" / "data").rglob("*.png"))
    assert files and all(f.is_symlink() and f.resolve().is_relative_to(assets / "train") for f in files)


# ---------------------------------------------------------------------------------------------- a round, in-process
def test_adapters_only_payload_and_a_nodes_round(assets, tmp_path):
    """What travels for alast-lora is exactly the adapters, the head and the final norm; a node's round returns
    the same tensors trained, keeps its ALaST budgets for the next round, and does not keep the full model."""
    from flwr.app import ArrayRecord

    from edge_alast.fleet.server import GlobalModel

    settings = FleetSettings.from_run_config(run_config(assets, tmp_path / "server"))
    model = GlobalModel(settings)
    tensors = model.tensors()
    expected = {n for n, _ in model.run.model.named_parameters()
                if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or n.startswith(("head.", "norm."))}
    assert set(tensors) == expected
    record = ArrayRecord(tensors)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.run.model.parameters())
    # count_bytes = the tensors' bytes + per tensor its name and the .npy header (shape, dtype)
    overhead = sum(len(record[n].data) - t.numel() * t.element_size() + len(n) for n, t in tensors.items())
    assert record.count_bytes() == tensor_bytes + overhead and overhead <= 200 * len(tensors)
    assert tensor_bytes == model.payload_facts()["tensor_bytes"] and tensor_bytes < 0.15 * model_bytes
    with pytest.raises(ConfigError, match="global tensors: 1 trainable parameters of this run are missing .head.bias"):
        model.load({n: t for n, t in tensors.items() if n != "head.bias"})

    node = NodeSettings(data=str(assets / "train"), out=str(tmp_path / "node"), name="n0")
    train_keys = {**settings.train, "classes": model.classes}
    first = train_round(node, train_keys, tensors, 1)
    assert set(first.tensors) == set(tensors) and first.metrics["steps"] == 2
    from edge_alast.fleet.validate import REPLY_METRICS

    assert set(first.metrics) == set(REPLY_METRICS)  # what the server's checks expect, key for key
    assert first.metrics["num-examples"] == 36 and first.metrics["peak-rss-bytes"] > 0
    assert any(not torch.equal(first.tensors[n], tensors[n]) for n in tensors)
    assert not (tmp_path / "node" / "round-0001" / "model.safetensors").exists()
    key = {"model": "vit_tiny_patch16_224", "method": "alast-lora", "img_size": 32, "classes": list(CLASSES)}
    budgets = load_policy(tmp_path / "node", key)["budgets"]  # round 1's final budgets, kept on the node
    second = train_round(node, train_keys, first.tensors, 2, proximal_mu=0.5)
    assert second.summary["steps"] == 2 and (tmp_path / "node" / POLICY_FILE).exists()
    lines = [json.loads(x) for x in (tmp_path / "node" / "round-0002" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["budget/raw"] == pytest.approx(budgets, abs=1e-6)  # round 2 started from them
    # FedProx is part of the round's objective: no pull at the global tensors, then one toward them
    steps = [r for r in lines if r["event"] == "step"]
    assert steps[0]["loss/proximal"] == 0.0 and steps[1]["loss/proximal"] > 0
    # the metrics come from train()'s result: its history and its training images
    assert second.metrics["train-loss"] == pytest.approx(sum(r["loss"] for r in steps) / 2)
    assert second.metrics["step-peak-bytes"] == max(r["mem/step_peak_bytes"] for r in steps)
    assert second.metrics["train-seconds"] == pytest.approx(sum(r["time/step_seconds"] for r in steps))
    assert second.metrics["num-examples"] == 36


def test_nodes_plan_within_their_own_profiles(assets, tmp_path):
    """A heterogeneous fleet: each node plans its round under its own profile's ceilings (a Jetson profile applied
    to this CPU with device cpu), and reports which."""
    from edge_alast.fleet.server import GlobalModel

    settings = FleetSettings.from_run_config(run_config(assets, tmp_path / "server"))
    model = GlobalModel(settings)
    train_keys = {**settings.train, "classes": model.classes}
    ceilings = {}
    for profile, device in (("jetson_orin_nano_4gb", "cpu"), ("raspberry_pi_4_4gb", None)):
        node = NodeSettings(data=str(assets / "train"), out=str(tmp_path / profile), profile=profile, device=device)
        result = train_round(node, train_keys, model.tensors(), 1)
        assert result.info["profile"] == profile and result.info["device"] == "cpu"
        ceilings[profile] = result.summary["memory_ceiling_bytes"]
    assert ceilings["jetson_orin_nano_4gb"] and ceilings["raspberry_pi_4_4gb"]
    assert ceilings["jetson_orin_nano_4gb"] != ceilings["raspberry_pi_4_4gb"]


# ---------------------------------------------------------------------------------------------- real federations
@pytest.mark.fleet
def test_two_node_two_round_federation(assets, tmp_path):
    out = tmp_path / "fleet"
    result = CliRunner().invoke(main, ["fleet", "local", "--nodes", "2", "--rounds", "2", "--json",
                                       "--partition", "dirichlet:1.0", "--timeout", str(RUN_TIMEOUT),
                                       "--config", str(train_file(tmp_path, assets, out))])
    assert result.exit_code == 0, result.output
    assert not leftover_processes(out)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["round"] for e in events if e["event"] == "round"] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "alast-lora"
    assert [r["round"] for r in summary["val_accuracy_per_round"]] == [0, 1, 2]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in summary["val_accuracy_per_round"])
    assert summary["val_accuracy"] == summary["val_accuracy_per_round"][-1]["val_accuracy"]
    for entry in read_rounds(out)[1:]:
        assert entry["ok"] == 2 and not entry["failed"] and {n["name"] for n in entry["nodes"]} == {"node0", "node1"}
    assert set(summary["node_peak_rss_bytes"]) == {"node0", "node1"}
    assert all(v > 0 for v in summary["node_peak_rss_bytes"].values())
    # bytes: each node receives and returns exactly the adapters + head + final norm (+ names and .npy headers)
    record = read_rounds(out)[1]["record_bytes_down"]
    assert summary["bytes_per_round"] == [{"round": r, "down": 2 * record, "up": 2 * record} for r in (1, 2)]
    assert record < summary["payload"]["tensor_bytes"] + 200 * summary["payload"]["tensors"]
    assert summary["payload"]["tensor_bytes"] < 0.15 * summary["payload"]["model_bytes"]
    for name in ("model.safetensors", "model.onnx", "manifest.json", "config.json"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["checkpoint-00000001.pt",
                                                                          "checkpoint-00000002.pt"]
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data", str(assets / "val"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["accuracy"] == pytest.approx(summary["val_accuracy"])


def _local_plan(assets, tmp_path, name, **fleet):
    from edge_alast.fleet.local import prepare_local

    train = dict(model="vit_tiny_patch16_224", model_args=TINY_ARGS, weights=str(assets / "tiny.safetensors"),
                 img_size=32, steps=2, batch_size=4, lr=1e-3, method="alast-lora", lora={"r": 2})
    return prepare_local(out=str(tmp_path / name), data=str(assets / "train"), val_data=str(assets / "val"),
                         nodes=2, rounds=2, train=train, fleet={"export": False, **fleet}, threads=1)


def _wait(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


@pytest.mark.fleet
def test_node_killed_mid_round_the_round_completes_and_the_node_rejoins(assets, tmp_path):
    from edge_alast.fleet.local import LocalFleet

    plan = _local_plan(assets, tmp_path, "kill-node")
    with LocalFleet(plan.out, plan.nodes, threads=plan.threads) as fleet:
        fleet.start()
        run_id = fleet.submit(plan.app_dir, plan.run_config)
        _wait(lambda: fleet.clientapp_running(1), 120, "node1's first ClientApp")
        assert not (plan.out / "rounds.jsonl").exists() or len((plan.out / "rounds.jsonl").read_text().splitlines()) < 2
        fleet.kill("node1")  # SIGKILL the SuperNode, its SuperExec and the ClientApp: a power cut in round 1
        fleet.start_node(1)  # the board comes back with the same node config
        status = fleet.wait_run(run_id, timeout=RUN_TIMEOUT)
        assert status["status"] == "finished:completed"
    assert not fleet.alive_pids() and not leftover_processes(plan.out)
    summary = json.loads((plan.out / "summary.json").read_text())
    _, first, second = read_rounds(plan.out)
    assert first["ok"] == 1 and [n["name"] for n in first["nodes"]] == ["node0"]
    assert len(first["failed"]) + len(first["missing"]) == 1  # node1's message: error reply (heartbeat) or timeout
    assert second["ok"] == 2 and {n["name"] for n in second["nodes"]} == {"node0", "node1"}  # it rejoined
    assert summary["rounds_completed"] == 2 and (plan.out / "model.safetensors").exists()


@pytest.mark.fleet
def test_server_killed_mid_round_resumes_from_its_checkpoint(assets, tmp_path):
    from edge_alast.training.checkpoint import verify
    from edge_alast.fleet.local import LocalFleet

    plan = _local_plan(assets, tmp_path, "kill-server")
    first_checkpoint = plan.out / "checkpoints" / "checkpoint-00000001.pt"
    with LocalFleet(plan.out, plan.nodes, threads=plan.threads) as fleet:
        fleet.start()
        old_run = fleet.submit(plan.app_dir, plan.run_config)
        _wait(lambda: first_checkpoint.with_suffix(".sha256").exists(), 180, "the round-1 checkpoint", poll=0.2)
        _wait(lambda: fleet.clientapp_running(0) or fleet.clientapp_running(1), 120, "round 2 on a node")
        round1 = json.loads((plan.out / "rounds.jsonl").read_text().splitlines()[1])
        fleet.kill("superlink")  # SuperLink, its SuperExec and the ServerApp: the server loses power in round 2
        assert not (plan.out / "checkpoints" / "checkpoint-00000002.pt").exists() and verify(first_checkpoint) is None
        fleet.start_superlink()  # same port, same database
        fleet.wait_nodes_online(2, supervise=True)
        fleet.stop_run(old_run)  # its ServerApp died with the link
        status = fleet.wait_run(fleet.submit(plan.app_dir, plan.run_config), timeout=RUN_TIMEOUT)
        assert status["status"] == "finished:completed"
    assert not fleet.alive_pids() and not leftover_processes(plan.out)
    summary = json.loads((plan.out / "summary.json").read_text())
    assert summary["resumed_after_round"] == [1] and summary["rounds_completed"] == 2
    rounds = read_rounds(plan.out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1] == round1  # round 1 came from the checkpoint, not run again
    assert rounds[2]["ok"] == 2 and (plan.out / "model.safetensors").exists()
    assert summary["nodes_per_round"][1]["ok"] == 2


@pytest.mark.fleet
def test_sigterm_stops_every_process(assets, tmp_path):
    """`fleet local` in a real subprocess: SIGTERM mid-run stops the SuperLink, the SuperNodes and what they
    started, and exits 75."""
    import subprocess
    import sys

    out = tmp_path / "term"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "edge-alast"), "fleet", "local", "--nodes", "2", "--rounds",
                             "3", "--json", "--config", str(train_file(tmp_path, assets, out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (out / "rounds.jsonl").exists() or proc.poll() is not None, 180, "round 0", poll=0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr[-2000:]
    assert not leftover_processes(out)


# ---------------------------------------------------------------------------------------------- trust at the edge
# The server's per-round aggregation (FleetStrategy.configure_train / aggregate_train, what Flower's Strategy.start
# calls each round) fed fake replies: real flwr Message/RecordDict objects, built as a node's ClientApp builds them.
GLOBAL = {"blocks.0.lora_A": np.full((4, 3), 0.5, np.float32), "head.weight": np.zeros((3, 4), np.float32),
          "head.bias": np.zeros(3, np.float32)}


@pytest.fixture
def flower_task():
    """Flower's process identity (set by a real ServerApp) so Messages can be built in the test process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class FakeGrid:
    """A Flower Grid without a SuperLink: ``reply(node_id, message)`` answers each message of a round."""

    def __init__(self, node_ids, reply=None):
        self.node_ids, self.reply = list(node_ids), reply

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:  # as the SuperLink does when it stores a message
            m.metadata.__dict__["_message_id"] = m.object_id
        return [r for r in (self.reply(m.metadata.dst_node_id, m) for m in messages) if r is not None]


def node_reply(sent, arrays=None, metrics=None, *, records=None, delta=0.01, node_id=None):
    """The reply a node's ClientApp sends: its tensors (default: the sent ones + ``delta``), its metrics, its info."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from edge_alast.fleet.validate import REPLY_METRICS

    if arrays is None:
        arrays = {n: a.numpy() + np.float32(delta) for n, a in sent.content["arrays"].items()}
    base = {k: (10 if kind is int else 0.5) for k, kind in REPLY_METRICS.items()}
    base["num-examples"] = 8
    content = records if records is not None else {
        "arrays": array_record(arrays),
        "metrics": MetricRecord({**base, **(metrics or {})}),
        "node": ConfigRecord({"name": f"node{sent.metadata.dst_node_id}", "profile": "", "method": "lora"})}
    return Message(RecordDict(content), reply_to=sent)


def array_record(arrays):
    """A Flower ArrayRecord of numpy arrays (or of Flower Arrays, kept as they are)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({n: a if isinstance(a, Array) else Array(np.asarray(a)) for n, a in arrays.items()})


def make_fleet_strategy(assets, tmp_path, **run):
    from edge_alast.fleet.server_app import make_strategy

    return make_strategy(FleetSettings.from_run_config(run_config(assets, tmp_path / "trust", **run)))


def run_round(strategy, replies_by_node, global_arrays=None, server_round=1):
    """One round as Strategy.start runs it: configure_train -> the grid -> aggregate_train. ``replies_by_node``:
    node id -> function(sent message) -> reply (None: no reply)."""
    from flwr.app import ConfigRecord

    arrays = array_record({n: a.copy() for n, a in (global_arrays or GLOBAL).items()})
    grid = FakeGrid(replies_by_node, lambda node, m: replies_by_node[node](m))
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies)


def honest(delta=0.01):
    return lambda m: node_reply(m, delta=delta)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _bad_replies():
    """name -> function(sent message) -> a malformed or poisoned reply (each one used to be aggregated or to stop
    the ServerApp)."""
    from flwr.app import Array, MetricRecord

    def with_array(name, array):
        def make(m):
            arrays = {n: a.numpy() + np.float32(0.01) for n, a in m.content["arrays"].items()}
            arrays[name] = array
            return node_reply(m, arrays)
        return make

    def lying_header(m):  # header (3,) float32 like head.bias, data a (1000, 1000) array
        arrays = {n: Array(a.numpy()) for n, a in m.content["arrays"].items()}
        arrays["head.bias"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                                    data=_npy(np.zeros((1000, 1000), np.float32)))
        return node_reply(m, arrays)

    def two_array_records(m):
        ok = node_reply(m)
        records = dict(ok.content.items())
        records["arrays2"] = array_record({n: a.numpy() for n, a in m.content["arrays"].items()})
        return node_reply(m, records=records)

    def missing_metric(m):
        ok = node_reply(m)
        metrics = dict(ok.content["metrics"])
        metrics.pop("train-loss")
        return node_reply(m, records={**dict(ok.content.items()), "metrics": MetricRecord(metrics)})

    def metrics_not_config(m):
        ok = node_reply(m)
        return node_reply(m, records={**dict(ok.content.items()), "node": MetricRecord({"x": 1})})

    nan = GLOBAL["head.weight"].copy()
    nan[0, 0] = np.nan
    return {
        "nan": with_array("head.weight", nan),
        "inf": with_array("head.weight", np.full((3, 4), np.inf, np.float32)),
        "1e30": with_array("head.weight", np.full((3, 4), 1e30, np.float32)),
        "int8": with_array("head.weight", np.ones((3, 4), np.int8)),
        "float64": with_array("head.weight", np.zeros((3, 4), np.float64)),
        "unicode dtype": with_array("head.bias", np.array(["a", "b", "c"])),
        "wrong shape": with_array("head.bias", np.zeros(4, np.float32)),
        "header shape right, data (1000, 1000)": lying_header,
        "num-examples inf": lambda m: node_reply(m, metrics={"num-examples": float("inf")}),
        "num-examples nan": lambda m: node_reply(m, metrics={"num-examples": float("nan")}),
        "num-examples a list": lambda m: node_reply(m, metrics={"num-examples": [1, 2]}),
        "num-examples 0": lambda m: node_reply(m, metrics={"num-examples": 0}),
        "num-examples 2.5": lambda m: node_reply(m, metrics={"num-examples": 2.5}),
        "train-loss nan": lambda m: node_reply(m, metrics={"train-loss": float("nan")}),
        "missing metric": missing_metric,
        "extra metric": lambda m: node_reply(m, metrics={"accuracy": 1.0}),
        "two array records": two_array_records,
        "a metric record for node info": metrics_not_config,
        "extra tensor": lambda m: node_reply(m, {**{n: a.numpy() for n, a in m.content["arrays"].items()},
                                                  "extra": np.zeros(2, np.float32)}),
        "no content records": lambda m: node_reply(m, records={}),
        "unchanged tensors": lambda m: node_reply(m, delta=0.0),
    }


@pytest.mark.parametrize("kind", list(_bad_replies()))
def test_a_bad_reply_is_left_out_named_and_the_round_goes_on(assets, tmp_path, flower_task, kind):
    strategy = make_fleet_strategy(assets, tmp_path)
    arrays, _ = run_round(strategy, {1: honest(0.01), 2: honest(0.03), 3: _bad_replies()[kind]})
    record = strategy.record
    assert record["ok"] == 2 and sorted(n["node_id"] for n in record["nodes"]) == [1, 2]
    [failed] = record["failed"]
    assert failed["node_id"] == 3 and failed["rejected"] and failed["reason"]
    for name, value in arrays.items():  # the two good nodes' mean (same weights), nothing of node 3
        assert np.allclose(value.numpy(), GLOBAL[name] + 0.02), name
    assert not record.get("no_update")


def test_a_bad_reply_is_counted_against_its_node_and_named_in_the_summary(assets, tmp_path, flower_task):
    from edge_alast.fleet.server_app import trust_summary

    strategy = make_fleet_strategy(assets, tmp_path)
    history = [{"round": 0}]
    bad = _bad_replies()
    for rnd, kind in ((1, "nan"), (2, "extra metric")):
        run_round(strategy, {1: honest(), 2: bad[kind] if rnd > 1 else honest(), 3: bad[kind]}, server_round=rnd)
        history.append(dict(strategy.record))
    summary = trust_summary(strategy.settings, history, strategy)
    # node 3 never sent a good reply to learn its name from: it is named by its Flower node id
    assert summary["rejections_per_node"] == {"3": 2, "node2": 1}
    rejected = sorted((r["round"], r["node_id"], r["reason"]) for r in summary["rejected_replies"])
    assert [r[:2] for r in rejected] == [(1, 3), (2, 2), (2, 3)]
    assert "non-finite" in rejected[0][2] and "unexpected accuracy" in rejected[1][2]


def test_every_reply_bad_keeps_the_global_model(assets, tmp_path, flower_task):
    strategy = make_fleet_strategy(assets, tmp_path)
    assert run_round(strategy, {1: _bad_replies()["nan"], 2: _bad_replies()["inf"]}) == (None, None)
    assert strategy.record["ok"] == 0 and "no usable reply" in strategy.record["no_update"]


def test_a_huge_num_examples_claim_is_capped_to_steps_times_batch(assets, tmp_path, flower_task):
    """One node claiming 1e12 images used to set the global mean to its own values; its weight is now capped at
    what a node trains in a round (steps-per-round x batch-size = 2 x 4)."""
    strategy = make_fleet_strategy(assets, tmp_path)
    assert strategy.settings.example_cap() == 8
    liar = lambda m: node_reply(m, delta=1.0, metrics={"num-examples": 10**12})  # noqa: E731
    arrays, _ = run_round(strategy, {1: honest(0.01), 2: honest(0.01), 3: honest(0.01), 4: liar})
    assert np.allclose(arrays["head.bias"].numpy(), 0.2575)  # (0.01 + 0.01 + 0.01 + 1) / 4, not ~1
    liar_entry = [n for n in strategy.record["nodes"] if n["node_id"] == 4][0]
    assert liar_entry["num_examples"] == 10**12 and liar_entry["weight"] == 8 and liar_entry["checks"]
    explicit = make_fleet_strategy(assets, tmp_path, **{"max-examples": 3})
    assert explicit.settings.example_cap() == 3


def test_update_norm_is_bounded_and_clipped(assets, tmp_path, flower_task):
    size = sum(a.size for a in GLOBAL.values())  # 27 values: an update of delta everywhere has norm delta*sqrt(27)
    strategy = make_fleet_strategy(assets, tmp_path, **{"max-update-norm": 10.0})
    run_round(strategy, {1: honest(0.01), 2: honest(1.0 / np.sqrt(size) * 11)})
    assert strategy.record["ok"] == 1 and "max-update-norm" in strategy.record["failed"][0]["reason"]

    strategy = make_fleet_strategy(assets, tmp_path, **{"clip-norm": 0.5})
    arrays, _ = run_round(strategy, {1: honest(0.001), 2: honest(100.0)})  # the x100 node is clipped to 0.5
    delta = np.concatenate([(arrays[n].numpy() - GLOBAL[n]).ravel() for n in GLOBAL])
    # both updates point the same way: the mean of norms 0.001 * sqrt(27) and 0.5
    assert np.linalg.norm(delta) == pytest.approx((0.001 * np.sqrt(size) + 0.5) / 2, rel=1e-4)
    node2 = [n for n in strategy.record["nodes"] if n["node_id"] == 2][0]
    assert node2["update_norm"] == pytest.approx(100 * np.sqrt(size), rel=1e-4) and "clipped" in node2["checks"][0]


def test_a_non_finite_aggregate_is_never_adopted_and_fedadam_moments_survive(assets, tmp_path, flower_task):
    """Replies that pass every check can still overflow an aggregator (FedAdam: a float32 update of 6e38 is inf,
    its moments then NaN): the aggregate is discarded, the global model and the moments stay as they were, and
    the next round aggregates normally."""
    strategy = make_fleet_strategy(assets, tmp_path, strategy="fedadam", **{"max-update-norm": 0.0})
    low = {n: np.full_like(a, -3e38) for n, a in GLOBAL.items()}
    high = lambda m: node_reply(m, {n: np.full_like(a, 3e38) for n, a in GLOBAL.items()})  # noqa: E731
    assert run_round(strategy, {1: high}, global_arrays=low) == (None, None)
    assert "non-finite" in strategy.record["no_update"] and strategy.base.m_t is None
    arrays, _ = run_round(strategy, {1: honest(0.1), 2: honest(0.1)}, server_round=2)
    assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert all(np.isfinite(v).all() for v in strategy.base.m_t.values())
    # a NaN reply to FedAdam is left out before it reaches the moments
    run_round(strategy, {1: honest(0.1), 2: _bad_replies()["nan"]}, server_round=3)
    assert all(np.isfinite(v).all() for v in strategy.base.m_t.values())


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_aggregators_resist_a_scaled_update(assets, tmp_path, flower_task, name):
    """Flower's robust aggregators behind the checks: 3 honest nodes and one sending its update x -100 (within the
    norm bound); the global update stays near the honest ones'."""
    strategy = make_fleet_strategy(assets, tmp_path, strategy=name, **{"trim-beta": 0.25})
    arrays, _ = run_round(strategy, {1: honest(0.01), 2: honest(0.02), 3: honest(0.03), 4: honest(-1.0)})
    update = arrays["head.bias"].numpy() - GLOBAL["head.bias"]
    assert np.all((update >= 0.005) & (update <= 0.035)), update
    fedavg = make_fleet_strategy(assets, tmp_path)
    arrays, _ = run_round(fedavg, {1: honest(0.01), 2: honest(0.02), 3: honest(0.03), 4: honest(-1.0)})
    assert np.all(arrays["head.bias"].numpy() < -0.2)  # plain FedAvg follows the attacker


def test_bulyan_without_enough_replies_keeps_the_global_model(assets, tmp_path, flower_task):
    strategy = make_fleet_strategy(assets, tmp_path, strategy="bulyan")  # needs 4f + 3 = 7 replies
    assert run_round(strategy, {i: honest() for i in range(1, 5)}) == (None, None)
    assert "Bulyan" in strategy.record["no_update"]


@pytest.mark.parametrize("mode", ["server", "client"])
def test_differential_privacy_wraps_flowers_fixed_clipping(assets, tmp_path, flower_task, mode):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from edge_alast.fleet.server_app import trust_summary

    strategy = make_fleet_strategy(assets, tmp_path, dp=mode, **{"clip-norm": 0.1, "dp-noise": 0.5})
    assert type(strategy.inner).__name__ == f"DifferentialPrivacy{mode.title()}SideFixedClipping"
    configs = []

    def reply(m):
        configs.append(dict(m.content["config"]))
        return node_reply(m, delta=1e-6)
    arrays, _ = run_round(strategy, {1: reply, 2: reply, 3: reply, 4: reply})
    assert (KEY_CLIPPING_NORM in configs[0]) == (mode == "client")  # the nodes' fixedclipping_mod clips
    noise = arrays["head.weight"].numpy() - GLOBAL["head.weight"] - 1e-6
    assert 0.002 < noise.std() < 0.05  # std 0.5 * 0.1 / 4 nodes = 0.0125
    assert [n["weight"] for n in strategy.record["nodes"]] == [1, 1, 1, 1]
    privacy = trust_summary(strategy.settings, [{"round": 1, **strategy.record}], strategy)["privacy"]
    assert privacy["noise_multiplier"] == 0.5 and privacy["clipping_norm"] == 0.1
    assert privacy["noise_std_per_round"] == [{"round": 1, "nodes": 4, "std": pytest.approx(0.0125)}]
    with pytest.raises(ConfigError, match="clip-norm"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", dp=mode))


def test_client_side_clipping_uses_flowers_mod(flower_task):
    """With the server's clipping norm in the config, the ClientApp's reply passes Flower's fixedclipping_mod."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from edge_alast.fleet import client_app

    sent = Message(RecordDict({"arrays": array_record({n: a.copy() for n, a in GLOBAL.items()}),
                               "config": ConfigRecord({KEY_CLIPPING_NORM: 0.1, "server-round": 1})}), 7, "train")
    sent.metadata.__dict__["_message_id"] = sent.object_id
    inner = lambda msg, ctx: node_reply(msg, delta=5.0)  # noqa: E731
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = client_app.fixedclipping_mod(sent, context, inner)
    delta = np.concatenate([(reply.content["arrays"][n].numpy() - GLOBAL[n]).ravel() for n in GLOBAL])
    assert np.linalg.norm(delta) == pytest.approx(0.1, rel=1e-4)


def test_fault_injection_corrupts_only_its_rounds():
    from edge_alast.fleet.client_app import apply_fault
    from edge_alast.fleet.settings import Fault

    sent = {"w": torch.zeros(3)}
    trained = {"w": torch.ones(3)}
    fault = Fault.parse("nan@2")
    assert apply_fault(fault, 1, sent, trained, {})[0]["w"].isfinite().all()
    assert apply_fault(fault, 2, sent, trained, {})[0]["w"].isnan().any()
    assert torch.equal(apply_fault(Fault.parse("scale:-10"), 1, sent, trained, {})[0]["w"], torch.full((3,), -10.0))
    assert apply_fault(Fault.parse("examples:1e12"), 1, sent, trained, {"num-examples": 5})[1]["num-examples"] == 10**12
    assert str(Fault.parse("scale:100@2,3")) == "scale:100@2,3"
    for bad in ("poison", "nan:3", "scale", "scale:x", "nan@0"):
        with pytest.raises(ConfigError, match="fault"):
            NodeSettings.from_node_config({"data": "d", "out": "o", "fault": bad})


def test_run_server_keeps_the_global_model_finite_and_names_the_poisoning_node(assets, tmp_path, flower_task):
    """The whole server (run_server: the real global model, evaluation, checkpoints, summary) over a fake grid:
    node 2 sends NaN in round 2; the round completes with the others, nothing non-finite is evaluated or saved,
    and the summary names the node."""
    from edge_alast.fleet.server_app import run_server
    from edge_alast.training.checkpoint import load_latest

    def reply(node_id, m):
        if node_id == 2 and int(m.content["config"]["server-round"]) == 2:
            arrays = {n: np.full_like(a.numpy(), np.nan) for n, a in m.content["arrays"].items()}
            return node_reply(m, arrays)
        return node_reply(m, delta=0.001 * node_id)

    settings = FleetSettings.from_run_config(run_config(assets, tmp_path / "server", **{"num-rounds": 3,
                                                                                        "export": "false"}))
    assert settings.export is False
    summary = run_server(FakeGrid([1, 2, 3], reply), settings)
    rounds = read_rounds(tmp_path / "server")
    assert [r["ok"] for r in rounds[1:]] == [3, 2, 3]
    assert rounds[2]["failed"][0]["node_id"] == 2 and "non-finite" in rounds[2]["failed"][0]["reason"]
    assert all(r["val_loss"] is not None and np.isfinite(r["val_loss"]) for r in rounds)
    state, _ = load_latest(tmp_path / "server" / "checkpoints")
    assert all(t.isfinite().all() for t in state["tensors"].values())
    assert summary["rejections_per_node"] == {"node2": 1}
    assert summary["rejected_replies"][0]["round"] == 2 and summary["rejected_replies"][0]["name"] == "node2"
    assert not (tmp_path / "server" / "model.onnx").exists()  # export="false" is False


def test_a_non_finite_checkpoint_is_not_resumed(assets, tmp_path, flower_task):
    from edge_alast.fleet.server import GlobalModel
    from edge_alast.fleet.server_app import run_server

    settings = FleetSettings.from_run_config(run_config(assets, tmp_path / "nan", **{"num-rounds": 2}))
    model = GlobalModel(settings)
    with torch.no_grad():
        next(p for _, p in model.run.trainable.parameters(model.run.model)).fill_(float("nan"))
    model.save_round(1, [{"round": 0}, {"round": 1}], {}, [])  # as a server before these checks could leave it
    with pytest.raises(ConfigError, match="non-finite"):
        run_server(FakeGrid([1]), settings)


# ---------------------------------------------------------------------------------------------- run config values
@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("clip-norm", float("inf")),
                                       ("round-timeout", float("nan")), ("proximal-mu", "inf"),
                                       ("num-rounds", 2.5), ("num-rounds", "3x"), ("export", "no"), ("export", 1),
                                       ("fraction-train", "-inf"), ("max-update-norm", float("nan"))])
def test_run_config_values_are_strict(assets, tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"run config {key}"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", **{key: value}))


def test_run_config_booleans_and_json_constants(assets, tmp_path):
    for text, expected in (("false", False), ("False", False), ("true", True), (False, False)):
        assert FleetSettings.from_run_config(run_config(assets, tmp_path / "s", export=text)).export is expected
    with pytest.raises(ConfigError, match="train-config"):
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", **{"train-config": '{"lr": NaN}'}))
    assert FleetSettings.from_run_config(run_config(assets, tmp_path / "s", **{"num-rounds": "4"})).num_rounds == 4


@pytest.mark.parametrize("key,value,message", [
    ("lr", 1e30, "run config: --lr: must be in (0, 1], got 1e+30"),
    ("seed", int("9" * 70), "run config: --seed: must be in [0, 9223372036854775807]"),
    ("train-config", '{"epochs": 1e400}', "run config: --epochs: must be a finite number"),
    ("train-config", '{"lora": {"r": 2, "targets": ["head"]}}', "run config: --lora-targets"),
    ("train-config", '{"max_aspect_ratio": 0.5}', "run config: --max-aspect-ratio: must be >= 1"),
])
def test_run_config_gets_the_clis_checks(assets, tmp_path, key, value, message):
    with pytest.raises(ConfigError) as e:
        FleetSettings.from_run_config(run_config(assets, tmp_path / "s", **{key: value}))
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------- keys, TLS, node auth
def test_fleet_keys_writes_a_ca_a_server_certificate_and_node_keys_flower_loads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    result = CliRunner().invoke(main, ["fleet", "keys", str(tmp_path / "k"), "--nodes", "2", "--host", "fleet.lan",
                                       "--host", "10.1.2.3"])
    assert result.exit_code == 0, result.output
    from edge_alast.fleet.keys import load_keys, write_keys

    keys = load_keys(tmp_path / "k")
    assert set(keys.hosts) == {"127.0.0.1", "::1", "localhost", "fleet.lan", "10.1.2.3"}
    assert sorted(keys.nodes) == ["node0", "node1"]
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(keys.server_cert.read_bytes()).verify_directly_issued_by(ca)
    for path in (keys.folder / "ca.key", keys.server_key, keys.nodes["node0"][0]):
        assert path.stat().st_mode & 0o777 == 0o600, path
    load_ssh_private_key(keys.nodes["node0"][0].read_bytes(), None)  # as flower-supernode reads it
    load_ssh_public_key(keys.nodes["node0"][1].read_bytes())  # as flwr supernode register reads it
    ca_bytes = keys.ca_cert.read_bytes()
    again = write_keys(tmp_path / "k", ["node0", "node2"], ["other.lan"])  # the CA stays; the server cert is reissued
    assert keys.ca_cert.read_bytes() == ca_bytes and "other.lan" in again.hosts and "server.pem" in again.written
    assert again.written[-2:] == ["nodes/node2", "nodes/node2.pub"]


def test_insecure_is_refused_off_loopback(tmp_path):
    from edge_alast.fleet.keys import is_loopback

    assert all(is_loopback(a) for a in ("127.0.0.1:9092", "localhost:1", "[::1]:9092", "127.0.0.5"))
    assert not any(is_loopback(a) for a in ("10.0.0.2:9092", "fleet.lan:9092", "0.0.0.0:9092", "[2001:db8::1]:1"))
    refused = CliRunner().invoke(main, ["fleet", "app", str(tmp_path / "a"), "--superlink", "fleet.lan:9092",
                                        "--insecure"])
    assert refused.exit_code == 2 and "--allow-insecure" in refused.output and not (tmp_path / "a").exists()
    for extra in (["--superlink", "127.0.0.1:9092"], ["--superlink", "fleet.lan:9092", "--allow-insecure"]):
        result = CliRunner().invoke(main, ["fleet", "app", str(tmp_path / "b"), "--insecure", *extra])
        assert result.exit_code == 0, result.output
        assert "--insecure" in (tmp_path / "b" / "DEPLOY.md").read_text()


def test_fleet_app_recipe_uses_tls_and_node_auth(tmp_path):
    keys = tmp_path / "keys"
    assert CliRunner().invoke(main, ["fleet", "keys", str(keys), "--host", "fleet.lan", "--nodes", "2"]).exit_code == 0
    result = CliRunner().invoke(main, ["fleet", "app", str(tmp_path / "app"), "--superlink", "fleet.lan:9092",
                                       "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    recipe = (tmp_path / "app" / "DEPLOY.md").read_text()
    assert f"--ssl-ca-certfile {keys}/ca.pem --ssl-certfile {keys}/server.pem --ssl-keyfile {keys}/server.key " \
           "--enable-supernode-auth" in recipe
    assert f"flwr supernode register {keys}/nodes/node1.pub fleet" in recipe
    assert f"--root-certificates {keys}/ca.pem --auth-supernode-private-key {keys}/nodes/node0" in recipe
    assert "--insecure" not in recipe
    wrong_host = CliRunner().invoke(main, ["fleet", "app", str(tmp_path / "app2"), "--superlink", "x.lan:9092",
                                           "--keys", str(keys)])
    assert wrong_host.exit_code == 2 and "does not name x.lan" in wrong_host.output


def test_docs_deployment_recipe_is_what_fleet_app_writes(tmp_path, monkeypatch):
    """docs/fleet.md's secure recipe is the one `fleet app` writes (built by the functions LocalFleet runs)."""
    from tests.helpers import REPO

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["fleet", "keys", "keys", "--host", "fleet.lan", "--nodes", "2"]).exit_code == 0
    assert CliRunner().invoke(main, ["fleet", "app", "app", "--superlink", "fleet.lan:9092",
                                     "--keys", "keys"]).exit_code == 0
    written = (tmp_path / "app" / "DEPLOY.md").read_text().split("\n", 2)[2].strip()
    docs = (REPO / "docs" / "fleet.md").read_text()
    block = docs.split("<!-- recipe:", 1)[1].split("-->", 1)[1].split("<!-- end recipe -->", 1)[0].strip()
    assert block == written
    assert "--enable-supernode-auth" in block and "--insecure" not in block


@pytest.mark.fleet
def test_tls_superlink_refuses_a_node_without_a_registered_key(assets, tmp_path):
    """TLS and Flower's node authentication on 127.0.0.1: a node with a registered key joins; a node without a key,
    and a node whose key was never registered, are refused and exit."""
    from edge_alast.fleet.keys import load_keys, write_keys
    from edge_alast.fleet.local import LocalFleet

    plan = _local_plan(assets, tmp_path, "auth")
    nodes = plan.nodes + [NodeSettings(data=plan.nodes[0].data, out=str(tmp_path / "n2"), name="node2")]
    keys_dir = tmp_path / "auth-keys"
    write_keys(keys_dir, ["node0", "node2"])
    keys = load_keys(keys_dir)
    with LocalFleet(plan.out, nodes, threads=1, keys=keys) as fleet:
        fleet.start_superlink()
        fleet.nodes = nodes[:1]
        fleet.register_nodes()  # node0 only: node2 has a key pair, but it is not registered
        fleet.nodes = nodes
        fleet.start_node(0)
        keyless = fleet.start_node(1, authenticate=False)
        unregistered = fleet.start_node(2)
        fleet.wait_nodes_online(1, timeout=120)
        _wait(lambda: keyless.poll() is not None and unregistered.poll() is not None, 120, "refused nodes to exit")
        listed = fleet.flwr("supernode", "list", "local")["nodes"]
        assert [n["status"] for n in listed] == ["online"] and int(listed[0]["node-id"]) == fleet.registered["node0"]
    link_log = (plan.out / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in link_log and "[Fleet.ActivateNode] Activated node_id" in link_log
    assert "SuperNode authentication is enabled" in (plan.out / "logs" / "node1.log").read_text()
    assert "Failed to activate SuperNode" in (plan.out / "logs" / "node2.log").read_text()
    assert not fleet.alive_pids() and not leftover_processes(plan.out)


@pytest.mark.fleet
def test_tls_federation_with_a_node_sending_nan_completes_finite(assets, tmp_path):
    """End to end, real processes (`fleet local --tls`): node1 sends NaN in round 2; every round completes with the
    other node, the global model stays finite, and the summary names node1."""
    out = tmp_path / "poison"
    result = CliRunner().invoke(main, ["fleet", "local", "--nodes", "2", "--rounds", "2", "--json", "--tls",
                                       "--fault", "node1=nan@2", "--no-export", "--timeout", str(RUN_TIMEOUT),
                                       "--config", str(train_file(tmp_path, assets, out))])
    assert result.exit_code == 0, result.output
    assert not leftover_processes(out)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events[0]["tls"] and events[0]["node_auth"] and events[0]["faults"] == {"node1": "nan@2"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["local"]["tls"] and set(summary["local"]["registered_nodes"]) == {"node0", "node1"}
    assert [(r["ok"], r["sent"]) for r in summary["nodes_per_round"]] == [(2, 2), (1, 2)]
    assert summary["rejections_per_node"] == {"node1": 1}
    assert summary["rejected_replies"][0]["round"] == 2 and "non-finite" in summary["rejected_replies"][0]["reason"]
    assert all(np.isfinite(r["val_loss"]) for r in summary["val_accuracy_per_round"])
    from edge_alast.training.checkpoint import load_latest

    state, _ = load_latest(out / "checkpoints")
    assert state["round"] == 2 and all(t.isfinite().all() for t in state["tensors"].values())
    assert "https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()


def test_each_rounds_server_evaluation_reads_at_most_eval_images(assets, tmp_path, monkeypatch):
    """Run config eval-images caps the server's evaluation after every round (default 0: the whole val-data)."""
    import edge_alast.fleet.server as server
    from edge_alast.fleet.server import GlobalModel

    read = []
    monkeypatch.setattr(server, "evaluate", lambda model, samples, *a, **k: read.append(len(samples)) or (0.5, 1.0))
    GlobalModel(FleetSettings.from_run_config(run_config(assets, tmp_path / "all"))).evaluate()
    capped = FleetSettings.from_run_config(run_config(assets, tmp_path / "capped", **{"eval-images": 5}))
    assert capped.train["eval_images"] == 5
    model = GlobalModel(capped)
    model.evaluate()
    assert read == [12, 5]  # val-data holds 3 classes x 4 images
    assert {label for _, label in model.run.final_eval_samples} == {0, 1, 2}  # spread over every class
