"""The command line: exit codes, JSON lines, run files, and signal/kill behaviour in real subprocesses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from edge_alast.training.checkpoint import checkpoints, verify
from edge_alast.cli.main import main
from tests.helpers import TINY_ARGS, TINY_MODEL, damaged_inside, jpeg_bytes, make_image_folder


def run_file(tmp_path, data, out, **extra):
    cfg = dict(data=str(data), out=str(out), model=TINY_MODEL, model_args=TINY_ARGS, img_size=32,
               steps=3, batch_size=4, lr=1e-3, val_fraction=0.25, export=False)
    cfg.update(extra)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_json_lines_exports_and_evaluates(image_folder, tmp_path):
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r")),
                                       "--method", "alast", "--export"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert [e["event"] for e in events][-2] == "export"
    assert sum(e["event"] == "step" for e in events) == 3
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    for name in ("summary.json", "model.safetensors", "model.onnx", "manifest.json"):
        assert (tmp_path / "r" / name).exists(), name
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "r"), "--data", str(image_folder), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["images"] == 12 and 0.0 <= evaluated["accuracy"] <= 1.0
    assert summary["val_accuracy"] is not None


@pytest.mark.parametrize("args,code,message", [
    (["--method", "qlora"], 2, "Invalid value for '--method'"),
    (["--method", "lora", "--lora-targets", "qkv,head"], 2, "--lora-targets"),
    (["--method", "light-peft", "--estimation-steps", "3"], 2, "--steps: must exceed --estimation-steps (3)"),
    (["--steps", "0"], 2, "--steps"),
    (["--profile", "no_such_board"], 2, "--profile"),
    (["--weights", "/nonexistent.safetensors"], 2, "--weights: no such file"),
    (["--data", "/nonexistent"], 3, "--data: /nonexistent is not a folder"),
])
def test_errors_have_documented_exit_codes(image_folder, tmp_path, args, code, message):
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r")),
                                       *args])
    assert result.exit_code == code, result.output
    assert message in result.output


def test_run_file_with_unknown_key_is_a_usage_error(image_folder, tmp_path):
    path = run_file(tmp_path, image_folder, tmp_path / "r", learning_rate=0.1)
    result = CliRunner().invoke(main, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "unknown keys learning_rate" in result.output


def test_output_folder_that_cannot_be_created(image_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, blocker / "run"))])
    assert result.exit_code == 2 and "--out: cannot write" in result.output


def test_no_usable_images_is_exit_3(tmp_path):
    data = tmp_path / "bad"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        (data / cls / "x.png").write_bytes(b"")
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, data, tmp_path / "r"))])
    assert result.exit_code == 3 and "no usable images" in result.output


# ---------------------------------------------------------------- real processes: SIGTERM and SIGKILL

def _spawn(cfg_path, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg_path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_steps(run_dir, n, proc, timeout=60):
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("trainer made no progress")


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["event"] == "step"]


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "data", per_class=12)


@pytest.fixture(scope="module")
def reference_run(slow_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = run_file(tmp, slow_data, tmp / "ref", steps=40, checkpoint_every_steps=1)
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return _losses(tmp / "ref"), json.loads((tmp / "ref" / "summary.json").read_text())


def test_sigterm_checkpoints_and_exits_75_then_resumes(slow_data, tmp_path, reference_run):
    cfg = run_file(tmp_path, slow_data, tmp_path / "r", steps=40, checkpoint_every_steps=1000)
    proc = _spawn(cfg)
    _wait_for_steps(tmp_path / "r", 3, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert time.monotonic() - t0 < 10
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "interrupted"
    [(step, path)] = checkpoints(tmp_path / "r")
    assert verify(path) is None and step == events[-1]["steps"] < 40
    assert not (tmp_path / "r" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "r") == pytest.approx(reference_run[0], rel=1e-6)


def test_reader_gone_checkpoints_and_exits_75_then_resumes(slow_data, tmp_path, reference_run):
    """The parent reading ``--json`` dies first (a benchmark or daemon stopped before its child): the next event
    write hits a broken pipe, and the run stops there as on SIGTERM -- checkpoint, exit 75 -- not with a
    traceback that loses the steps since the last checkpoint."""
    cfg = run_file(tmp_path, slow_data, tmp_path / "r", steps=40, checkpoint_every_steps=1000)
    proc = _spawn(cfg)
    _wait_for_steps(tmp_path / "r", 3, proc)
    proc.stdout.close()  # the reader goes away
    assert proc.wait(timeout=30) == 75
    err = proc.stderr.read()
    assert "broken pipe" in err and "Traceback" not in err, err
    [(step, path)] = checkpoints(tmp_path / "r")
    assert verify(path) is None and 3 <= step < 40
    assert not (tmp_path / "r" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "r") == pytest.approx(reference_run[0], rel=1e-6)


KILL_TRIALS = int(os.environ.get("EDGE_ALAST_KILL_TRIALS", "3"))


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_sigkill_at_random_moments_then_resume_reaches_same_result(slow_data, tmp_path, reference_run, trial):
    rng = random.Random(1000 + trial)
    cfg = run_file(tmp_path, slow_data, tmp_path / "r", steps=40, checkpoint_every_steps=1)
    kills = 0
    while kills < 2:  # two power losses per trial, at random points of the run
        proc = _spawn(cfg)
        try:
            _wait_for_steps(tmp_path / "r", 1, proc)
        except pytest.fail.Exception:
            if proc.poll() == 0:
                break  # the run completed before the kill
            raise
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate()
        kills += 1
    final = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg)],
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert _losses(tmp_path / "r") == pytest.approx(reference_run[0], rel=1e-6)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(reference_run[1]["val_loss"], rel=1e-6)
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


def test_single_class_is_exit_3(tmp_path):
    data = make_image_folder(tmp_path / "one", classes=("only",), per_class=4)
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, data, tmp_path / "r"))])
    assert result.exit_code == 3 and "at least two class folders" in result.output


def test_invalid_profile_file_is_exit_2(image_folder, tmp_path):
    bad = tmp_path / "board.yaml"
    bad.write_text("name: board\ndevice: abacus\n")
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r")),
                                       "--profile", str(bad)])
    assert result.exit_code == 2 and "board.yaml" in result.output


def test_weights_of_another_model_is_exit_2(image_folder, tmp_path):
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r")),
                                       "--weights", str(tmp_path / "resnet.safetensors")])
    assert result.exit_code == 2 and "missing keys" in result.output and "unexpected keys: fc.weight" in result.output


def test_bad_images_in_data_are_skipped_and_named(image_folder, tmp_path):
    (image_folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n")
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r"))])
    assert result.exit_code == 0
    warnings = [json.loads(x) for x in result.stdout.splitlines() if '"warning"' in x]
    assert any("broken.png" in w["message"] for w in warnings)
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r2")),
                                       "--max-bad-fraction", "0.01"])
    assert result.exit_code == 3 and "unreadable" in result.output


def test_sd_notify_sends_status_datagrams(image_folder, tmp_path, monkeypatch):
    import socket

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "r"))])
    assert result.exit_code == 0, result.output
    messages = []
    sock.setblocking(False)
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    sock.close()
    assert messages[0].startswith("READY=1\nSTATUS=training vit_tiny_patch16_224 (alast)")
    assert any(m.startswith("STATUS=step 3/3") for m in messages)
    assert messages[-1] == "STOPPING=1\nSTATUS=done"


def test_recompute_blocks_option(image_folder, tmp_path):
    cfg = str(run_file(tmp_path, image_folder, tmp_path / "r"))
    result = CliRunner().invoke(main, ["train", "--config", cfg, "--recompute-blocks", "1,2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["recompute_blocks"] == [1, 2]
    result = CliRunner().invoke(main, ["train", "--config", cfg, "--recompute-blocks", "a,b"])
    assert result.exit_code == 2 and "--recompute-blocks" in result.output


def test_options_come_from_the_config_dataclasses():
    import dataclasses

    from edge_alast.config import TrainConfig
    from edge_alast.methods import METHODS

    params = {p.name: p for p in main.commands["train"].params}
    assert tuple(params["method"].type.choices) == tuple(METHODS)
    for f in dataclasses.fields(TrainConfig):  # every flagged field is an option, its default in the help
        if f.metadata.get("flag"):
            assert f.name in params, f.name
            if isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool):
                assert f"[default: {f.default}]" in params[f.name].help, f.name
    assert "[default: 8]" in params["lora_r"].help


def test_light_peft_options_reach_the_run(image_folder, tmp_path):
    out = tmp_path / "lp"
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, out, steps=4)),
                                       "--method", "light-peft", "--estimation-steps", "2", "--lora-r", "2",
                                       "--lora-targets", "qkv,fc2", "--lora-alpha", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["lora"] == {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv", "fc2"]}
    assert config["light_peft"]["estimation_steps"] == 2
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["step"] for e in events if e["event"] == "prune"] == [3]


def test_file_failing_at_use_is_named_and_too_many_is_exit_3(image_folder, tmp_path):
    (image_folder / "a" / "damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    cfg = run_file(tmp_path, image_folder, tmp_path / "r", batch_size=13, val_data=str(image_folder))
    result = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    warnings = [json.loads(x)["message"] for x in result.stdout.splitlines() if '"warning"' in x]
    assert any("damaged.jpg" in w and "unreadable when loaded" in w for w in warnings)
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "r2"),
                                       "--max-bad-fraction", "0.05"])
    assert result.exit_code == 3 and "unreadable" in result.output and "damaged.jpg" in result.output


def test_a_real_file_size_limit_while_checkpointing_is_exit_6(image_folder, tmp_path):
    """torch.save under RLIMIT_FSIZE (SIGXFSZ ignored: writes past it fail with EFBIG, as on a full card): torch's
    own RuntimeError is recognised as a full disk; nothing but the small files before it was written."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the checkpoint is ~450 KiB

    from tests.helpers import REPO

    config = run_file(tmp_path, image_folder, tmp_path / "r", steps=4, checkpoint_every_steps=2,
                      allocator="glibc")  # no re-execution with another malloc: one interpreter start
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(config), "--json"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 6, proc.stderr
    # torch's short-write RuntimeError or the flush's EFBIG, depending on which write crosses the limit first
    assert "checkpoint at step 2: disk full writing" in proc.stderr
    assert "RuntimeError" in proc.stderr or "File too large" in proc.stderr
    assert checkpoints(tmp_path / "r") == [] and not list((tmp_path / "r").glob(".*.tmp"))


@pytest.mark.parametrize("args,option", [(["eval", "{tmp}", "--data", "{tmp}", "--batch-size", "0"], "--batch-size"),
                                         (["demo-data", "{tmp}/d", "--size", "0"], "--size"),
                                         (["demo-data", "{tmp}/d", "--per-class", "0"], "--per-class")])
def test_eval_and_demo_data_refuse_out_of_range_numbers_before_doing_anything(tmp_path, args, option):
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "d").exists()


def _step_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "step"' in x]


def test_ablation_flags_reach_the_plan(image_folder, tmp_path):
    """Freezing only (--alast-b-init 1 --alast-b-min 1: every token, K of 4 blocks) and token dropping only
    (--no-alast-freeze: every block, fewer tokens), from the command line on a 4-block model."""
    deep = {**TINY_ARGS, "depth": 4}
    freezing = tmp_path / "freezing"
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, freezing,
                                                                          model_args=deep)),
                                       "--alast-b-init", "1", "--alast-b-min", "1", "--alast-k-trainable", "2"])
    assert result.exit_code == 0, result.output
    for r in _step_lines(freezing):
        assert r["tokens/per_block"] == [17] * 4 and len(r["blocks/trainable"]) == 2
    tokens = tmp_path / "tokens"
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tokens,
                                                                          model_args=deep)), "--no-alast-freeze",
                                       "--alast-anneal-last", "0"])  # the default's last steps see every token
    assert result.exit_code == 0, result.output
    for r in _step_lines(tokens):
        assert r["blocks/trainable"] == [0, 1, 2, 3] and r["tokens/per_block"][-1] < 17
    assert json.loads((tokens / "config.json").read_text())["config"]["alast"]["freeze"] is False
    result = CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, tmp_path / "bad")),
                                       "--alast-anneal-last", "1.5"])
    assert result.exit_code == 2 and "--alast-anneal-last: must be in [0, 1)" in result.output


def test_eval_train_view_uses_the_runs_mean_keep_ratios(image_folder, tmp_path):
    out = tmp_path / "r"
    assert CliRunner().invoke(main, ["train", "--config", str(run_file(tmp_path, image_folder, out))]).exit_code == 0
    steps = _step_lines(out)
    means = [sum(r["plan/keep_ratio"][i] for r in steps) / len(steps) for i in range(3)]
    plain = json.loads(CliRunner().invoke(main, ["eval", str(out), "--data", str(image_folder), "--json"]).stdout)
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(image_folder), "--json", "--train-view"])
    assert result.exit_code == 0, result.output
    viewed = json.loads(result.stdout)
    assert viewed["view"] == "train" and plain["view"] == "all tokens" and "keep_ratios" not in plain
    assert viewed["keep_ratios"] == pytest.approx(means, abs=1e-6) and max(means) < 1.0
    assert viewed["loss"] != plain["loss"]  # fewer tokens, another output
    (out / "metrics.jsonl").write_text("")  # the summary keeps the mean keep ratios: the same view
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(image_folder), "--json", "--train-view"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["keep_ratios"] == viewed["keep_ratios"]
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "alast_schedule"}))
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(image_folder), "--train-view"])
    assert result.exit_code == 2 and "--train-view" in result.output and "no training steps" in result.output


def test_sigusr1_asks_train_to_finish_and_sigterm_to_stop():
    from edge_alast.cli.common import FinishOnSignal, StopOnSignal

    with StopOnSignal() as stop, FinishOnSignal() as finish:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert finish() and not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handlers before are back


@pytest.mark.parametrize("module", ["main", "store"])
@pytest.mark.parametrize("as_json", [True, False])
def test_printers_survive_a_reader_gone_and_ask_to_stop(module, as_json, monkeypatch, capsys):
    """``train`` and ``update`` print through :class:`EventPrinter`: a broken pipe on stdout sets ``stdout_lost``
    (which both commands poll beside SIGTERM), points the descriptor at /dev/null and says so on stderr; the events
    after it are not written and raise nothing."""
    import importlib

    printer = importlib.import_module(f"edge_alast.cli.{module}")._Printer(as_json)
    read_end, write_end = os.pipe()
    os.close(read_end)
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    event = {"event": "step", "step": 10, "steps": 40, "loss": 0.5, "tokens/per_block": [5, 4]}
    printer(event)
    assert printer.stdout_lost
    assert os.fstat(write_end).st_rdev == os.stat(os.devnull).st_rdev
    printer(event)
    printer({"event": "warning", "message": "after"})
    assert "broken pipe" in capsys.readouterr().err
    sys.stdout.close()
