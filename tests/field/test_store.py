"""Field updates: the model store, the update procedure, its gate, replay, kills, bad input and the systemd unit.

Tiny in-file ViTs (conftest.TINY) and synthetic colour images; updates train a few steps.
"""
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import REPO, TINY, make_image_folder, tiny_model
from edge_alast.cli.main import main
from edge_alast.field import replay
from edge_alast.field.store import Store
from edge_alast.field.update import UpdateConfig, gate, init_store, update
from edge_alast.model.build import map_head, read_state_dict

TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
FAST = dict(steps=4, lr=1e-3, batch_size=8, checkpoint_every_seconds=None)
UNIT = REPO / "examples" / "systemd" / "edge-alast-update.service"


def cli(*args):
    return [sys.executable, "-m", "edge_alast.cli", *map(str, args)]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def make_store(root: Path, classes=("a", "b"), seed=0) -> Path:
    """A store whose v0001 is a tiny random ViT for ``classes``, with a holdout and a replay sample."""
    torch.manual_seed(seed)
    import safetensors.torch

    weights = root / "w.safetensors"
    safetensors.torch.save_file(tiny_model(seed=seed).state_dict(), str(weights))
    init_store(root / "store", weights=weights, classes=list(classes), model="vit_tiny_patch16_224",
               model_args=TINY_ARGS, img_size=32, holdout=make_image_folder(root / "h0", classes, 3, seed=100),
               replay_data=make_image_folder(root / "r0", classes, 6, seed=101))
    return root / "store"


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("base"))


@pytest.fixture
def store(base_store, tmp_path):
    shutil.copytree(base_store, tmp_path / "store", symlinks=True)
    return tmp_path / "store"


def assert_current_whole(store_dir: Path) -> str:
    """``current`` names a complete version whose files match their sha256, and its ONNX model runs."""
    from edge_alast.deploy.predict import session

    s = Store(store_dir)
    name = s.current_name()
    assert s.verify(name) == [], name
    sess = session(store_dir / "current" / "model.onnx")
    out = sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert out.shape == (1, len(s.version(name).classes))
    return name


# ---------------------------------------------------------------- head mapping by class name

def test_map_head_moves_rows_by_name_appends_new_and_drops_absent():
    torch.manual_seed(0)
    state = {"head.weight": torch.randn(3, 4), "head.bias": torch.randn(3), "blocks.0.w": torch.randn(2)}
    new_row = {"head.weight": torch.ones(4), "head.bias": torch.tensor(7.0)}
    out = map_head(state, ["a", "b", "c"], ["c", "a", "d"], {"d": new_row})
    torch.testing.assert_close(out["head.weight"][0], state["head.weight"][2])  # c moved, same row
    torch.testing.assert_close(out["head.weight"][1], state["head.weight"][0])  # a
    torch.testing.assert_close(out["head.weight"][2], torch.ones(4))  # d: the given row
    assert out["head.bias"][2] == 7.0 and out["head.bias"].shape == (3,)  # b dropped
    assert out["blocks.0.w"] is state["blocks.0.w"]
    zeros = map_head(state, ["a", "b", "c"], ["b", "a", "c", "e"])
    assert torch.equal(zeros["head.weight"][3], torch.zeros(4))


@pytest.mark.parametrize("init", ["mean", "zeros"])
def test_update_keeps_known_rows_in_any_order_appends_new_and_keeps_absent(store, tmp_path, init):
    """NEW_DIR holds b and a (not c, in other folder order) and the new class d; lr so small the rows do not move."""
    s = Store(store)
    make_image_folder(tmp_path / "new", ("b", "a", "d"), per_class=4, seed=5)
    before = read_state_dict(s.version().path / "model.safetensors")
    result = update(store, tmp_path / "new", UpdateConfig(**{**FAST, "lr": 1e-12, "steps": 2}, new_class_init=init,
                                                          tolerance=1.0, max_old_drop=1.0))
    assert result.decision == "published"
    v = s.version()
    assert v.classes == ["a", "b", "d"] and v.parent == "v0001"
    after = read_state_dict(v.path / "model.safetensors")
    for i, name in enumerate(["a", "b"]):
        torch.testing.assert_close(after["head.weight"][i], before["head.weight"][i], atol=1e-6, rtol=0)
    row = after["head.weight"][2]
    if init == "zeros":
        assert row.abs().max() < 1e-6
    else:  # the mean normalised feature, scaled to the known rows' mean norm
        assert float(row.norm()) == pytest.approx(float(before["head.weight"].norm(dim=1).mean()), rel=1e-3)
    assert result.record["new_class_init"] == ({"mean": ["d"], "zeros": []} if init == "mean"
                                               else {"mean": [], "zeros": ["d"]})

    # a class the model knows and NEW_DIR lacks is kept (a and b absent now)
    make_image_folder(tmp_path / "only_d", ("d",), per_class=4, seed=6)
    update(store, tmp_path / "only_d", UpdateConfig(**FAST, tolerance=1.0, max_old_drop=1.0))
    assert s.version().classes == ["a", "b", "d"]


# ---------------------------------------------------------------- the gate

FIG = {"accuracy": 0.80, "old_accuracy": 0.90}


@pytest.mark.parametrize("candidate,parity,kwargs,publish,reason", [
    ({"accuracy": 0.85, "old_accuracy": 0.89}, True, {}, True, None),
    ({"accuracy": 0.80, "old_accuracy": 0.90}, True, {}, True, None),  # not lower: published
    ({"accuracy": 0.79, "old_accuracy": 0.95}, True, {}, False, "below current's"),
    ({"accuracy": 0.79, "old_accuracy": 0.95}, True, {"tolerance": 0.02}, True, None),
    ({"accuracy": 0.95, "old_accuracy": 0.85}, True, {}, False, "classes current knew fell"),
    ({"accuracy": 0.95, "old_accuracy": 0.85}, True, {"max_old_drop": 0.1}, True, None),
    ({"accuracy": 0.95, "old_accuracy": 0.95}, False, {}, False, "parity failed"),
    (None, False, {}, False, "no holdout accuracy"),
])
def test_gate_decisions(candidate, parity, kwargs, publish, reason):
    options = {"tolerance": 0.0, "max_old_drop": 0.02, **kwargs}
    decision = gate(FIG, candidate, {"passed": parity}, **options)
    assert decision["publish"] is publish
    assert (reason is None) == (not decision["reasons"])
    if reason:
        assert any(reason in r for r in decision["reasons"])


def test_gate_without_holdout_images_of_known_classes_passes_that_check_and_says_so():
    decision = gate({"accuracy": 0.5, "old_accuracy": None}, {"accuracy": 0.9, "old_accuracy": None},
                    {"passed": True}, tolerance=0.0, max_old_drop=0.02)
    assert decision["publish"] and "not measured" in decision["checks"]["old_classes"]["note"]


def test_sabotaged_candidate_is_never_published(store, tmp_path, monkeypatch):
    """The candidate's weights blow up to NaN in its second step (as a huge lr did before --lr was capped at 1);
    exit 4, current untouched."""
    from edge_alast.training import trainer

    real_step = trainer._forward_backward_step

    def blow_up(run, stage, *args):
        out = real_step(run, stage, *args)
        if args[-2] == 1:  # step index
            next(p for p in run.model.parameters() if p.requires_grad).data.fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer, "_forward_backward_step", blow_up)
    make_image_folder(tmp_path / "new", ("a", "b"), per_class=6, seed=7)
    s = Store(store)
    before = s.current_name()
    result = CliRunner().invoke(main, ["update", str(store), "--data", str(tmp_path / "new"), "--steps", "4",
                                       "--batch-size", "8", "--json"])
    assert result.exit_code == 4, result.output
    record = json.loads(result.stdout.splitlines()[-1])
    assert record["event"] == "update" and record["decision"] == "kept"
    assert any("no candidate: training diverged" in r for r in record["reasons"]), record["reasons"]
    assert s.current_name() == before == "v0001" and s.version_names() == ["v0001"]
    assert_current_whole(store)
    assert s.history()[-1]["decision"] == "kept"
    assert not (store / "work").exists()


def test_good_update_is_published_with_figures_and_history(store, tmp_path):
    make_image_folder(tmp_path / "new", ("a", "b", "c"), per_class=8, seed=8)
    events = []
    result = update(store, tmp_path / "new", UpdateConfig(**{**FAST, "steps": 10}), on_event=events.append)
    assert result.decision == "published" and result.exit_code == 0, result.record["reasons"]
    s = Store(store)
    v = s.version()
    assert v.name == "v0002" and v.classes == ["a", "b", "c"]
    holdout = v.info["metrics"]["holdout"]
    assert holdout["per_class"].keys() == {"a", "b", "c"} and holdout["new_accuracy"] is not None
    assert v.manifest["sha256"] == v.info["files"]["model.onnx"]  # still an export manifest
    assert s.history()[-1]["id"] == result.record["id"]
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["prepare", "train", "evaluate", "publish"]
    # held-out images are never trained on: disjoint from the replay sample, and from what this update trained on
    state = s.state()
    held = {e["sha256"] for e in state["holdout"]}
    assert held and not held & {i["sha256"] for i in replay.items(state["replay"])}
    assert result.record["data"]["train_new"] + result.record["data"]["holdout_new"] == 24
    start = next(e for e in events if e["event"] == "start")
    assert start["train_images"] == result.record["data"]["train_new"] + result.record["data"]["replayed"]
    # The same command again (e.g. the daemon restarted after a kill that came once the update was complete):
    # nothing trains, nothing is published twice, the first decision is reported again.
    again = update(store, tmp_path / "new", UpdateConfig(**{**FAST, "steps": 10}), on_event=events.append)
    assert again.decision == "published" and again.exit_code == 0 and again.record["already_applied"]
    assert again.record["id"] == result.record["id"] and again.record["version"] == "v0002"
    assert s.version_names() == ["v0001", "v0002"] and [r["event"] for r in s.history()].count("update") == 1
    # other options are another update: it runs
    other = update(store, tmp_path / "new", UpdateConfig(**{**FAST, "steps": 4}))
    assert "already_applied" not in other.record


def test_a_compute_budget_ends_the_candidates_training_and_the_history_says_so(store, tmp_path):
    """--max-tflops is train's budget: the candidate ends after the step that spends it, is exported and judged
    as any other, and the history records how many steps it took and why it ended."""
    make_image_folder(tmp_path / "new", ("a", "b"), per_class=6, seed=3)
    result = update(store, tmp_path / "new", UpdateConfig(**{**FAST, "steps": 10, "max_tflops": 1e-9}))
    assert result.decision in ("published", "kept")
    assert (result.record["train"]["steps"], result.record["train"]["finished_by"]) == (1, "budget")
    for bad in ("0", "-1", "nan", "inf"):
        out = CliRunner().invoke(main, ["update", str(store), "--data", str(tmp_path / "new"), "--max-tflops", bad])
        assert out.exit_code == 2 and "--max-tflops: must be a finite number > 0" in out.output, (bad, out.output)


def test_holdout_images_are_not_in_the_training_folder(store, tmp_path):
    make_image_folder(tmp_path / "new", ("a", "c"), per_class=6, seed=9)
    stops = iter([True])
    result = update(store, tmp_path / "new", UpdateConfig(**FAST), should_stop=lambda: next(stops, True))
    assert result.decision == "interrupted" and result.exit_code == 75
    marker = json.loads((store / "work" / "update.json").read_text())
    trained = {p.stem for p in (store / "work" / "train").rglob("*") if p.is_symlink()}
    held = {e["sha256"] for e in marker["plan"]["holdout"]}
    assert held and trained and not held & trained
    # the interrupted update resumes and finishes
    assert update(store, tmp_path / "new", UpdateConfig(**FAST, tolerance=1.0, max_old_drop=1.0)).decision \
        == "published"


def test_relative_store_path_links_replay_and_holdout_images_that_resolve(store, tmp_path, monkeypatch):
    # The training and validation folders are symlinks into the store; a relative STORE made them relative to
    # the process's working directory, so they dangled and the trainer skipped them (no replay) without a word.
    make_image_folder(tmp_path / "new", ("a", "c"), per_class=6, seed=31)
    monkeypatch.chdir(tmp_path)
    stops = iter([True])
    result = update("store", "new", UpdateConfig(**FAST), should_stop=lambda: next(stops, True))
    assert result.decision == "interrupted"
    links = [p for p in (store / "work").rglob("*") if p.is_symlink()]
    replayed = {i["sha256"] for i in replay.items(Store(store).state()["replay"])}
    assert replayed and replayed <= {p.stem for p in (store / "work" / "train").rglob("*") if p.is_symlink()}
    assert links and all(p.exists() for p in links), [str(p) for p in links if not p.exists()][:3]


# ---------------------------------------------------------------- replay

def test_replay_caps_hold_and_every_class_stays_represented():
    rng = np.random.default_rng(0)
    sample = {}
    classes = ["a", "b", "c", "d", "e"]
    for step in range(12):  # unbalanced updates; classes arrive over time
        new = {c: [{"id": f"{c}{step}-{i}", "bytes": int(rng.integers(100, 400))}
                   for i in range(int(rng.integers(0, 40)))] for c in classes[:2 + step // 3]}
        sample = replay.offer(sample, new, max_images=40, max_bytes=6000, seed=[1, step])
        cap_images, cap_bytes = replay.class_caps(len(sample), 40, 6000)
        for name, entry in sample.items():
            assert len(entry["items"]) <= cap_images
            assert sum(i["bytes"] for i in entry["items"]) <= cap_bytes
            assert entry["items"] or entry["seen"] == 0
        assert replay.totals(sample)["images"] <= 40 and replay.totals(sample)["bytes"] <= 6000
    assert set(sample) == set(classes)
    assert replay.offer(sample, {}, max_images=0, max_bytes=6000, seed=0)["a"]["items"] == []


def test_replay_is_a_uniform_sample_of_everything_a_class_saw():
    counts = np.zeros(100)
    for trial in range(300):
        sample = {}
        for batch in range(4):  # 100 images in 4 updates of 25
            new = {"a": [{"id": batch * 25 + i, "bytes": 1} for i in range(25)]}
            sample = replay.offer(sample, new, max_images=10, max_bytes=10**6, seed=[trial, batch])
        for item in sample["a"]["items"]:
            counts[item["id"]] += 1
    first, last = counts[:50].sum(), counts[50:].sum()  # an early image is kept as often as a late one
    assert abs(first - last) / (first + last) < 0.1


def test_store_replay_sample_respects_the_caps_after_an_update(store, tmp_path):
    make_image_folder(tmp_path / "new", ("a", "b", "c"), per_class=10, seed=10)
    result = update(store, tmp_path / "new", UpdateConfig(**FAST, replay_max_images=6, replay_max_bytes=10**6,
                                                          tolerance=1.0, max_old_drop=1.0))
    assert result.decision == "published"
    sample = Store(store).state()["replay"]
    assert {n: len(v["items"]) for n, v in sample.items()} == {"a": 2, "b": 2, "c": 2}
    assert sample["a"]["seen"] == 6 + result.record["data"]["per_class"]["a"]["train"]  # init's 6 + this update's
    s = Store(store)
    listed = {i["file"] for name in s.version_names() for i in replay.items(s.state(name)["replay"])}
    files = {p.relative_to(store).as_posix() for p in (store / "replay").rglob("*") if p.is_file()}
    assert files == listed  # images no version lists are deleted


# ---------------------------------------------------------------- versions: keep, rollback

def test_keep_prunes_old_versions_but_never_current_or_its_parent_and_rollback(store, tmp_path):
    for k in range(3):
        make_image_folder(tmp_path / f"n{k}", ("a", "b"), per_class=4, seed=20 + k)
        r = update(store, tmp_path / f"n{k}", UpdateConfig(**FAST, keep=1, tolerance=1.0, max_old_drop=1.0))
        assert r.decision == "published"
    s = Store(store)
    assert s.version_names() == ["v0003", "v0004"]  # keep 1: the newest, plus current's parent
    runner = CliRunner()
    result = runner.invoke(main, ["store", "rollback", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"event": "rollback", "version": "v0003", "from": "v0004"}
    assert assert_current_whole(store) == "v0003"
    result = runner.invoke(main, ["store", "rollback", str(store), "v0001"])
    assert result.exit_code == 2 and "no version v0001" in result.output
    result = runner.invoke(main, ["store", "rollback", str(store), "v0004"])
    assert result.exit_code == 0 and s.current_name() == "v0004"
    listing = json.loads(runner.invoke(main, ["store", "list", str(store), "--json"]).stdout)
    assert [v["version"] for v in listing["versions"]] == ["v0003", "v0004"] and listing["current"] == "v0004"
    assert listing["disk"]["total"] >= sum(listing["disk"]["versions"].values()) > 0
    shown = json.loads(runner.invoke(main, ["store", "show", str(store), "v0003", "--json"]).stdout)
    assert shown["verified"] and shown["parent"] == "v0002" and shown["bytes"] > 0
    assert [r["event"] for r in s.history()][-2:] == ["rollback", "rollback"]


def test_init_from_a_run_folder_and_refusals(tmp_path, image_folder):
    from edge_alast import TrainConfig, train

    train(TrainConfig(data=str(image_folder), out=str(tmp_path / "run"), model="vit_tiny_patch16_224",
                      model_args=TINY_ARGS, img_size=32, steps=2, batch_size=4, export=False))
    runner = CliRunner()
    result = runner.invoke(main, ["store", "init", str(tmp_path / "s"), "--from", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    v = Store(tmp_path / "s").version()
    assert v.classes == ["a", "b"] and v.info["model"]["model_args"] == TINY_ARGS and v.parent is None
    assert assert_current_whole(tmp_path / "s") == "v0001"
    result = runner.invoke(main, ["store", "init", str(tmp_path / "s"), "--from", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    result = runner.invoke(main, ["store", "init", str(tmp_path / "s2"), "--weights", str(tmp_path / "run" /
                                                                                       "model.safetensors")])
    assert result.exit_code == 2 and "--classes" in result.output
    assert not (tmp_path / "s2").exists()


# ---------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error_and_changes_nothing(store, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    unreadable = tmp_path / "unreadable"
    for cls in ("a", "b"):
        (unreadable / cls).mkdir(parents=True)
        (unreadable / cls / "x.png").write_bytes(b"not a png")
        (unreadable / cls / "y.jpg").write_bytes(b"")
    cases = [
        ([str(store), "--data", str(tmp_path / "empty")], 3, "no class sub-folders"),
        ([str(store), "--data", str(unreadable)], 3, "no usable images"),
        ([str(store), "--data", str(tmp_path / "missing")], 3, "is not a folder"),
        ([str(tmp_path), "--data", str(unreadable)], 2, "is not a model store"),
        ([str(store), "--data", str(unreadable), "--holdout-fraction", "1.5"], 2, "--holdout-fraction"),
        ([str(store), "--data", str(unreadable), "--method", "light-peft"], 2, "--method"),
        ([str(store), "--data", str(unreadable), "--lr", "2"], 2, "--lr: must be in (0, 1]"),
    ]
    assert UpdateConfig().lr is None  # the method's default, as train resolves it (1e-3 for the adapter methods)
    for args, code, message in cases:
        result = runner.invoke(main, ["update", *args])
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
    assert Store(store).version_names() == ["v0001"] and assert_current_whole(store) == "v0001"
    result = runner.invoke(main, ["store", "list", str(tmp_path)])
    assert result.exit_code == 2 and "is not a model store" in result.output


def test_full_disk_is_a_clear_error_nothing_lost_and_the_update_resumes(store, tmp_path):
    """A file-size limit in the child (SIGXFSZ ignored: writes past it fail with EFBIG, as on a full card)."""
    make_image_folder(tmp_path / "new", ("a", "b", "c"), per_class=6, seed=11)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))  # the tiny model's weights are ~150 KiB

    args = cli("update", store, "--data", tmp_path / "new", "--steps", 4, "--lr", "1e-3", "--batch-size", 8,
               "--tolerance", 1, "--max-old-drop", 1)
    proc = subprocess.run(args, capture_output=True, text=True, env=env(), preexec_fn=small_files, timeout=300)
    assert proc.returncode == 6, proc.stderr  # DiskFullError: its own exit code
    assert "disk full" in proc.stderr and "File too large" in proc.stderr
    assert "current version is v0001, whole" in proc.stderr
    assert assert_current_whole(store) == "v0001" and Store(store).version_names() == ["v0001"]
    resumed = update(store, tmp_path / "new", UpdateConfig(**FAST, tolerance=1.0, max_old_drop=1.0))
    assert resumed.decision == "published" and assert_current_whole(store) == "v0002"


# ---------------------------------------------------------------- SIGKILL at random instants

def _kill_at_random(args, store_dir, rng, kills, timeout=300):
    """Start ``args`` and SIGKILL it at a random instant, ``kills`` times or until it exits by itself; after each
    kill ``current`` must be whole. Half the kills wait for a version being written (``.tmp-*``) or for a step."""
    def progress():
        return ({p.name for p in (store_dir / "work" / "run").glob("checkpoint-*.pt")}
                | {p.name for p in store_dir.iterdir() if p.name.startswith(".tmp-")})

    for k in range(kills):
        seen = progress()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
        deadline = time.monotonic() + (rng.uniform(1.0, 12.0) if k % 2 == 0 else timeout)
        while time.monotonic() < deadline and proc.poll() is None:
            if k % 2 and progress() - seen:  # a new checkpoint, or a version being written
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            assert proc.returncode in (0, 4), proc.stderr.read()
            return proc.returncode
        proc.kill()
        proc.communicate()
        assert_current_whole(store_dir)
    final = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)
    assert final.returncode in (0, 4), final.stderr
    return final.returncode


KILL_TRIALS = int(os.environ.get("EDGE_ALAST_KILL_TRIALS", "1"))


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_sigkill_during_update_and_rollback_leaves_current_whole(store, tmp_path, trial):
    rng = random.Random(2000 + trial)
    make_image_folder(tmp_path / "new", ("a", "b", "c"), per_class=8, seed=12)
    args = cli("update", store, "--data", tmp_path / "new", "--steps", 12, "--lr", "1e-3", "--batch-size", 8,
               "--checkpoint-every-steps", 1, "--tolerance", 1, "--max-old-drop", 1, "--json")
    assert _kill_at_random(args, store, rng, kills=3) == 0
    s = Store(store)
    assert assert_current_whole(store) == "v0002" and s.version_names() == ["v0001", "v0002"]
    assert [r["event"] for r in s.history()].count("update") == 1  # published once, recorded once
    assert not (store / "work").exists()
    for target in ("v0001", "v0002", "v0001"):
        proc = subprocess.Popen(cli("store", "rollback", store, target), stderr=subprocess.PIPE, env=env())
        time.sleep(rng.uniform(0.5, 4.0))
        proc.kill()
        proc.communicate()
        assert assert_current_whole(store) in ("v0001", "v0002")


# ---------------------------------------------------------------- the systemd unit, as written

def unit_commands(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Environment= and Exec*= lines of a unit file (one command per key here)."""
    environ, commands = {}, {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            key, value = line.removeprefix("Environment=").split("=", 1)
            environ[key] = value
        elif re.match(r"^Exec\w+=", line):
            key, value = line.split("=", 1)
            commands[key] = shlex.split(value)
    return environ, commands


def systemd_argv(words: list[str], environ: dict[str, str]) -> list[str]:
    """What systemd runs: ${VAR} from Environment=, $$ -> $, %% -> %, and edge-alast as this interpreter."""
    out = []
    for word in words:
        word = re.sub(r"\$\{(\w+)\}", lambda m: environ[m.group(1)], word)
        out.append(word.replace("$$", "$").replace("%%", "%"))
    if out[0].endswith("/edge-alast"):
        out = cli(*out[1:])
    return out


def test_systemd_unit_commands_run_an_update_with_notify_and_watchdog(store, tmp_path):
    environ, commands = unit_commands(UNIT)
    assert set(commands) == {"ExecCondition", "ExecStartPre", "ExecStart", "ExecStopPost"}
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()
    spool = {k: str(tmp_path / k.lower()) for k in ("INCOMING", "BATCH", "DONE")}
    environ = {**environ, "STORE": str(store), **spool}
    run_env = {**env(), **environ}

    def run(key, extra_env=None, extra_args=()):
        return subprocess.run(systemd_argv(commands[key], environ) + list(extra_args), capture_output=True,
                              text=True, env={**run_env, **(extra_env or {})}, timeout=300)

    assert run("ExecCondition").returncode != 0  # nothing to learn: the service does not start
    make_image_folder(Path(spool["INCOMING"]), ("a", "b", "c"), per_class=6, seed=13)
    assert run("ExecCondition").returncode == 0
    assert run("ExecStartPre").returncode == 0
    assert (Path(spool["BATCH"]) / "c").is_dir() and Path(spool["INCOMING"]).is_dir()

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages, done = [], threading.Event()

    def receive():  # as the service manager does, while the service runs
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                continue

    reader = threading.Thread(target=receive)
    reader.start()
    try:  # the unit's command line, with a few steps and no thresholds (this host is not the device it names)
        proc = run("ExecStart", {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"},
                   ["--steps", "4", "--lr", "1e-3", "--batch-size", "8", "--tolerance", "1", "--max-old-drop", "1"])
    finally:
        time.sleep(0.3)
        done.set()
        reader.join()
        sock.close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["decision"] == "published"
    assert messages[0].startswith("READY=1") and messages[-1].startswith("STOPPING=1")
    assert messages.count("WATCHDOG=1") >= 2  # at most every 0.5 s here (WATCHDOG_USEC 1 s); the update takes longer
    assert run("ExecStopPost", {"EXIT_STATUS": str(proc.returncode)}).returncode == 0
    assert not Path(spool["BATCH"]).exists() and len(list(Path(spool["DONE"]).iterdir())) == 1
    assert run("ExecCondition").returncode != 0
    assert assert_current_whole(store) == "v0002"


# ---------------------------------------------------------------- device key (issue 22)

def test_with_a_device_key_manifests_are_signed_and_a_planted_version_is_refused(tmp_path, monkeypatch):
    import safetensors.torch

    key = tmp_path / "device.key"
    key.write_bytes(os.urandom(32))
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tiny_model().state_dict(), str(weights))
    init_store(tmp_path / "store", weights=weights, classes=["a", "b"], model="vit_tiny_patch16_224",
               model_args=TINY_ARGS, img_size=32, device_key=key)
    store_dir = tmp_path / "store"
    assert (store_dir / "v0001" / "manifest.sig").read_text().startswith("hmac-sha256:")
    runner = CliRunner()
    ok = runner.invoke(main, ["store", "show", str(store_dir), "--json"], env={"EDGE_ALAST_DEVICE_KEY_FILE": str(key)})
    assert ok.exit_code == 0 and json.loads(ok.stdout)["verified"], ok.output
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    wrong = runner.invoke(main, ["store", "show", str(store_dir), "--device-key", str(other)])
    assert wrong.exit_code == 2 and "signature does not match" in wrong.output
    # a planted version: a copy whose manifest claims other classes, re-hashed but not signed with the key
    shutil.copytree(store_dir / "v0001", store_dir / "v0002")
    manifest = json.loads((store_dir / "v0002" / "manifest.json").read_text())
    manifest["store"].update(version="v0002", classes=["a", "b", "intruder"])
    (store_dir / "v0002" / "manifest.json").write_text(json.dumps(manifest))
    Store(store_dir).set_current("v0002")
    assert Store(store_dir).version().classes == ["a", "b", "intruder"]  # without the key nothing tells
    for sig in ("kept", "removed"):
        if sig == "removed":
            (store_dir / "v0002" / "manifest.sig").unlink()
        result = runner.invoke(main, ["update", str(store_dir), "--data", str(tmp_path), "--device-key", str(key)])
        assert result.exit_code == 2, result.output
        assert ("signature does not match" if sig == "kept" else "no device-key signature") in result.output
    from edge_alast.integrity import read_device_key

    assert Store(store_dir, key=read_device_key(key)).version("v0001").name == "v0001"  # the signed one still reads


def test_a_planted_history_or_lock_link_is_refused_and_its_target_untouched(tmp_path):
    from edge_alast.errors import UnsafePathError

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "s").mkdir()
    store = Store(tmp_path / "s", _new=True)
    for name, use in (("history.jsonl", lambda: store.append_history({"event": "x"})),
                      (".lock", lambda: store.locked().__enter__())):
        (tmp_path / "s" / name).symlink_to(victim)
        with pytest.raises(UnsafePathError, match=f"{re.escape(name)}: is a symbolic link"):
            use()
        assert victim.read_text() == "precious\n"
