"""What a run folder holds: metrics.jsonl read through power-loss damage, the metric names older versions wrote, the
same per-block budgets for the report and train-ort, JSON files with named errors, and the tuned model's weights."""
import json

import pytest
import torch

from edge_alast.deploy.ort_training import average_budgets
from edge_alast.errors import ConfigError
from edge_alast.report import load_run
from edge_alast.runfolder import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, budget_metric, load_run_model,
                                  metric, read_json, read_json_if_any, read_metrics, save_model, scan_metrics, steady,
                                  truncate_metrics)
from tests.helpers import TINY_ARGS, TINY_MODEL

DEPTH = 3


def write_lines(path, *records, tail: bytes = b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)
    return path


# ---------------------------------------------------------------------------------------------- metrics.jsonl
def test_damaged_lines_are_skipped_and_counted(tmp_path):
    path = write_lines(tmp_path / METRICS_FILE, {"event": "start"}, {"event": "step", "step": 1}, [1, 2],
                       tail=b"\n\xff\xfe not utf-8\n" + b'{"event": "step", "step": 2, "lo')  # torn by a power loss
    records, skipped = scan_metrics(path)
    assert [r["event"] for r in records] == ["start", "step"]
    assert skipped == 3  # the list, the undecodable bytes, the torn last line (the blank line is not counted)
    assert read_metrics(path) == records
    assert read_metrics(tmp_path / "none.jsonl") == []
    with pytest.raises(FileNotFoundError):
        scan_metrics(tmp_path / "none.jsonl")


def test_truncate_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    path = write_lines(tmp_path / METRICS_FILE, {"event": "start"}, {"event": "step", "step": 1},
                       {"event": "checkpoint", "step": 2}, {"event": "step", "step": 3}, tail=b'{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [r.get("step") for r in read_metrics(path)] == [None, 1, 2]
    assert scan_metrics(path)[1] == 0  # the torn line is gone too
    truncate_metrics(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


def test_steady_leaves_out_at_most_five_warm_up_steps_and_never_more_than_a_fifth():
    assert steady(list(range(30))) == list(range(5, 30))
    assert steady(list(range(10))) == list(range(2, 10))
    assert steady([7.0, 8.0]) == [7.0, 8.0]


# ---------------------------------------------------------------------------------------------- metric names
def test_an_old_name_reads_as_the_new_one_and_the_new_one_wins():
    old, new = {"budget/keep_ratio": [0.5]}, {"plan/keep_ratio": [0.7], "budget/keep_ratio": [0.5]}
    assert metric(old, "plan/keep_ratio") == [0.5]
    assert metric(new, "plan/keep_ratio") == [0.7]
    assert metric({}, "plan/keep_ratio", "none") == "none" and metric(old, "budget/raw") is None


def step_lines(steps: int, **per_block) -> list[dict]:
    """Step lines whose per-block metrics are ``per_block[name](step)``."""
    return [{"event": "step", "step": s, "loss": 1.0 / s, "blocks/trainable": list(range(DEPTH)),
             **{name: f(s) for name, f in per_block.items()}} for s in range(1, steps + 1)]


RAW = lambda s: [0.9, 0.8 - 0.05 * s, 0.7]  # noqa: E731
PLAN = lambda s: [1.0, 0.75, 0.5]  # noqa: E731


@pytest.mark.parametrize("written, key", [
    ({"budget/raw": RAW, "plan/keep_ratio": PLAN}, "budget/raw"),  # a run of this version: the policy's budgets
    ({"budget/keep_ratio": PLAN}, "plan/keep_ratio"),  # a run from before budget/raw: its plans' keep ratios
])
def test_the_report_and_train_ort_read_the_same_budgets(tmp_path, written, key):
    run = tmp_path / "run"
    run.mkdir()
    write_lines(run / METRICS_FILE, *step_lines(4, **written))
    source = written.get(key) or written["budget/keep_ratio"]
    expected = [sum(source(s)[b] for s in range(1, 5)) / 4 for b in range(DEPTH)]

    assert budget_metric(read_metrics(run / METRICS_FILE)) == key
    report_matrix = load_run(run).block_matrix(key)
    assert report_matrix.mean(axis=1).tolist() == pytest.approx(expected)
    assert average_budgets(run / METRICS_FILE, DEPTH) == pytest.approx(expected)


def test_no_per_block_budgets():
    assert budget_metric(step_lines(2)) is None


# ---------------------------------------------------------------------------------------------- JSON files
def test_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: not a run folder .{SUMMARY_FILE} missing."):
        read_json(tmp_path / SUMMARY_FILE)
    (tmp_path / "cut.json").write_text('{"steps": 3')
    with pytest.raises(ConfigError, match=r"cut.json: cannot read"):
        read_json(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list.json: cannot read: not a JSON object"):
        read_json(tmp_path / "list.json")
    assert read_json_if_any(tmp_path / "cut.json") is None and read_json_if_any(tmp_path / "absent.json") is None
    (tmp_path / "ok.json").write_text('{"steps": 3}')
    assert read_json(tmp_path / "ok.json") == read_json_if_any(tmp_path / "ok.json") == {"steps": 3}


# ---------------------------------------------------------------------------------------------- the tuned model
def hand_written_run(tmp_path, classes=("a", "b", "c"), summary_extra=None):
    """A run folder as the trainer leaves it (config.json, summary.json), without training."""
    from edge_alast.model.build import create_model

    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(json.dumps({"config": {"model": TINY_MODEL, "img_size": 32,
                                                          "model_args": TINY_ARGS}}))
    (run / SUMMARY_FILE).write_text(json.dumps({"classes": list(classes), "profile": "laptop_cpu",
                                                **(summary_extra or {})}))
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, num_classes=len(classes), img_size=32, **TINY_ARGS)
    return run, model


def test_saved_weights_load_back_exactly_with_the_runs_facts(tmp_path):
    run, model = hand_written_run(tmp_path, summary_extra={"eval_transform": {"crop_pct": 0.9, "crop_mode": "center"}})
    save_model(model, run)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    loaded, meta = load_run_model(run)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert not loaded.training
    assert (meta["model_name"], meta["classes"], meta["img_size"]) == (TINY_MODEL, ["a", "b", "c"], 32)
    assert (meta["crop_pct"], meta["crop_mode"], meta["profile"]) == (0.9, "center", "laptop_cpu")


def test_a_run_without_weights_or_with_other_weights_is_a_config_error(tmp_path):
    run, model = hand_written_run(tmp_path, classes=("a", "b"))
    with pytest.raises(ConfigError, match=f"no {MODEL_FILE}"):
        load_run_model(run)
    save_model(torch.nn.Linear(2, 2), run)
    with pytest.raises(ConfigError, match=f"{MODEL_FILE} does not match {TINY_MODEL} with 2 classes"):
        load_run_model(run)
    (run / SUMMARY_FILE).unlink()
    with pytest.raises(ConfigError, match="not a run folder"):
        load_run_model(run)
