"""The training loop end to end: every method runs, files and summary fields, real images lower the loss."""
import json

import pytest
import torch

from conftest import TINY
from edge_alast.config import TrainConfig
from edge_alast.errors import ConfigError, DataError
from edge_alast.trainer import train

TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
SUMMARY_KEYS = {"method", "model", "steps", "val_accuracy", "mean_step_seconds", "peak_rss_bytes",
                "train_flops_per_step", "total_train_flops", "profile"}


def tiny_config(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="vit_tiny_patch16_224", model_args=dict(TINY_ARGS),
                img_size=32, steps=3, batch_size=4, lr=1e-3, val_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["alast", "full", "head"])
def test_every_method_runs_and_writes_run_folder(image_folder, tmp_path, method):
    events = []
    result = train(tiny_config(image_folder, tmp_path / "run", method=method), on_event=events.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary == result.summary
    assert summary["method"] == method and summary["steps"] == 3
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert summary["total_train_flops"] == pytest.approx(3 * summary["train_flops_per_step"], rel=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "tokens/per_block", "blocks/trainable", "time/step_seconds", "flops/step",
            "mem/peak_rss_bytes"} <= set(lines[0])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 3
    tokens = lines[0]["tokens/per_block"]
    if method == "alast":
        assert tokens[0] == 17 and tokens[-1] < 17 and len(lines[0]["blocks/trainable"]) == 3  # ceil(3/4*3)
    else:
        assert tokens == [17, 17, 17]
        assert len(lines[0]["blocks/trainable"]) == (3 if method == "full" else 0)


def test_flop_ratios_between_methods(image_folder, tmp_path):
    flops = {m: train(tiny_config(image_folder, tmp_path / m, method=m)).summary["train_flops_per_step"]
             for m in ("full", "alast", "head")}
    assert flops["head"] < flops["alast"] < flops["full"]


def test_same_seed_same_run(image_folder, tmp_path):
    a = train(tiny_config(image_folder, tmp_path / "a")).summary
    b = train(tiny_config(image_folder, tmp_path / "b")).summary
    assert a["final_loss"] == b["final_loss"] and a["budgets"] == b["budgets"]


def test_should_stop_ends_early(image_folder, tmp_path):
    summary = train(tiny_config(image_folder, tmp_path / "r", steps=10), should_stop=lambda: True).summary
    assert summary["steps"] == 1 and summary["stopped_early"]


def test_bad_config_and_data_errors(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        train(tiny_config(image_folder, tmp_path / "r", method="lora"))
    with pytest.raises(ConfigError, match="--steps"):
        train(tiny_config(image_folder, tmp_path / "r", steps=0))
    with pytest.raises(DataError, match="--data"):
        train(tiny_config(tmp_path / "missing", tmp_path / "r"))
    with pytest.raises(ConfigError, match="--profile"):
        train(tiny_config(image_folder, tmp_path / "r", profile="no_such_board"))


def test_profile_supplies_defaults(image_folder, tmp_path):
    summary = train(tiny_config(image_folder, tmp_path / "r", profile="raspberry_pi_4_4gb", batch_size=None)).summary
    assert summary["profile"] == "raspberry_pi_4_4gb" and summary["precision"] == "fp32"
    assert summary["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_profile_without_cuda_needs_device_cpu(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--device cpu"):
        train(tiny_config(image_folder, tmp_path / "r", profile="jetson_orin_nano_8gb"))
    summary = train(tiny_config(image_folder, tmp_path / "r", profile="jetson_orin_nano_8gb", device="cpu")).summary
    assert summary["device"] == "cpu" and summary["profile"] == "jetson_orin_nano_8gb"


@pytest.mark.assets
def test_short_alast_run_on_real_images_lowers_the_loss(fashion_mnist, shared_weights, tmp_path):
    """Shared ViT-S/14 at 56 px (16 patches) on 4 Fashion-MNIST classes: validation loss falls with training."""
    def run(steps, name):
        cfg = TrainConfig(data=str(fashion_mnist / "train"), val_data=str(fashion_mnist / "val"), out=str(tmp_path / name),
                          weights=str(shared_weights), img_size=56, steps=steps, batch_size=16, lr=1e-4,
                          precision="bf16", method="alast", seed=0)
        return train(cfg).summary

    before, after = run(1, "one_step"), run(25, "trained")
    assert after["val_loss"] < 0.8 * before["val_loss"]
    assert after["val_accuracy"] > before["val_accuracy"]
    assert after["val_accuracy"] > 0.6  # 4 classes: chance is 0.25
