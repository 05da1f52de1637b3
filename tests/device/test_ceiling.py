"""Ceilings that hold for the whole process: a training run (with its evaluation, saving and ONNX export) inside
a real memory cgroup limited to the profile's ceiling finishes without an OOM kill, fresh and resumed.

cgroup v1 (``memory.limit_in_bytes``) or v2 (``memory.max``) needs root; where neither can be created the tests skip
with the reason, except in CI (``EDGE_ALAST_REQUIRE_ASSETS=1``), where the machine provides them.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
from memcgroup import MemoryCgroup  # noqa: E402

pytestmark = pytest.mark.assets
def cgroup_or_skip(limit: int) -> MemoryCgroup:
    try:
        return MemoryCgroup(limit)
    except OSError as e:
        if os.environ.get("EDGE_ALAST_REQUIRE_ASSETS") == "1":
            pytest.fail(f"cannot create a memory cgroup: {e}")
        pytest.skip(f"cannot create a memory cgroup ({e}; needs root and the memory controller)")


def train_command(tmp_path, fashion_mnist, shared_weights, out, **extra):
    cfg = {"data": str(fashion_mnist / "train"), "val_data": str(fashion_mnist / "val"), "out": str(out),
           "weights": str(shared_weights), "img_size": 224, "batch_size": 16, "steps": 6, "lr": 3e-5,
           "precision": "fp32", "checkpoint_every_steps": 2, **extra}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"]


def run_in(cgroup, command, stop_after_steps=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=cgroup.enter if cgroup else None)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_after_steps and '"event": "step"' in line and json.loads(line)["step"] >= stop_after_steps:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    return proc.returncode, [json.loads(x) for x in lines if x.startswith("{")], proc.stderr.read()


def profile_with_ceiling(tmp_path, ceiling: int) -> str:
    data = yaml.safe_load((REPO / "device_profiles" / "laptop_cpu.yaml").read_text())
    data.update(name="cgroup_board", memory_ceiling_bytes=int(ceiling), threads=2)
    path = tmp_path / "cgroup_board.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_alast_run_with_export_fits_a_real_cgroup_at_its_profile_ceiling_fresh_and_resumed(
        tmp_path, fashion_mnist, shared_weights):
    # The unconstrained run sets the scale: its whole-process peak (training, evaluation, saving, export).
    code, events, err = run_in(None, train_command(tmp_path, fashion_mnist, shared_weights, tmp_path / "free"))
    assert code == 0, err[-2000:]
    free = json.loads((tmp_path / "free" / "summary.json").read_text())
    ceiling = int(0.85 * free["peak_rss_bytes"])  # binding: the planner must cap the run to fit

    cgroup = cgroup_or_skip(ceiling)
    try:
        out = tmp_path / "capped"
        command = train_command(tmp_path, fashion_mnist, shared_weights, out,
                                profile=profile_with_ceiling(tmp_path, ceiling))
        code, events, err = run_in(cgroup, command, stop_after_steps=3)  # SIGTERM: checkpoint, exit 75
        assert code == 75 and cgroup.oom_kills() == 0, err[-2000:]
        code, events, err = run_in(cgroup, command)  # resumed inside the same limit
        assert code == 0 and cgroup.oom_kills() == 0, err[-2000:]
        assert next(e for e in events if e["event"] == "start")["resumed_from_step"] >= 2
    finally:
        cgroup.remove()
    summary = json.loads((out / "summary.json").read_text())
    for name in ("summary.json", "model.safetensors", "model.onnx", "manifest.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert summary["memory_ceiling_bytes"] == ceiling and summary["planner_notes"] != ["fits without caps"]
    assert summary["peak_rss_bytes"] <= ceiling and summary["train_peak_rss_bytes"] <= summary["peak_rss_bytes"]
