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
