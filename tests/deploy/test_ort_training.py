"""ONNX Runtime on-device training: block choice from budgets, artifacts, a torch-free loop whose loss falls."""
import json
import os

import onnx
import pytest
from click.testing import CliRunner

from edge_alast.cli.deploy import export as export_cmd
from edge_alast.cli.deploy import train_ort as train_ort_cmd
from edge_alast.errors import ConfigError
from edge_alast.deploy.ort_training import (average_budgets, choose_trainable_blocks, generate_training_artifacts,
                                     is_trainable, train_ort)
from edge_alast.deploy.onnxmeta import read_metadata
from edge_alast.deploy.predict import predict
from tests.helpers import make_image_folder, make_run, run_cli_without_torch


def test_trainable_blocks_follow_average_budgets(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [[0.5, 1.0, 0.6, 0.9], [0.5, 0.8, 0.8, 0.9]]
    metrics.write_text("".join(json.dumps({"step": i + 1, "budget/keep_ratio": r}) + "\n" for i, r in enumerate(rows))
                       + '{"step": 3, "budget/kee')  # a torn last line is skipped
    budgets = average_budgets(metrics, 4)
    assert budgets == pytest.approx([0.5, 0.9, 0.7, 0.9])
    assert choose_trainable_blocks(budgets) == [3]  # tie 0.9/0.9: the later block
    assert choose_trainable_blocks(budgets, 0.5) == [1, 3]
    assert choose_trainable_blocks([1.0] * 12) == [9, 10, 11]  # full/head runs: the top blocks
    assert average_budgets(tmp_path / "missing.jsonl", 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="--trainable-fraction"):
        choose_trainable_blocks(budgets, 0.0)
    assert is_trainable("blocks.3.mlp.fc1.weight", [3]) and is_trainable("head.bias", [3])
    assert not is_trainable("blocks.1.norm1.weight", [3]) and not is_trainable("pos_embed", [3])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort")
    data = make_image_folder(root / "train", classes=("a", "b"), per_class=8)
    run = make_run(data, root / "run")
    result = CliRunner().invoke(export_cmd, [str(run), "--format", "ort-training", "--json"])
    assert result.exit_code == 0, result.output
    return run / "ort_training", data


def test_artifacts_folder(artifacts):
    folder, _ = artifacts
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "eval_model.onnx", "meta.json",
                                                         "optimizer_model.onnx", "training_model.onnx"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    info = json.loads((folder / "meta.json").read_text())
    assert info["trainable_blocks"] == [2]  # ceil(0.25 * 3) = 1 block; ALaST budgets tie -> the last
    assert {"norm.weight", "head.weight", "blocks.2.attn.qkv.weight"} <= set(info["requires_grad"])
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed.")) for n in info["requires_grad"])
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(str(folder / name)).ir_version <= 10


def test_ort_training_loss_falls_and_exports(artifacts, tmp_path):
    folder, data = artifacts
    summary = train_ort(folder, data, tmp_path / "out", steps=10, batch_size=8, lr=2e-3)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert summary["method"] == "ort-training" and summary["steps"] == 10 and summary["trainable_blocks"] == [2]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    model = tmp_path / "out" / "model.onnx"
    meta = read_metadata(model)
    assert meta["class_names"] == ["a", "b"] and meta["summary"]["method"] == "ort-training"
    assert onnx.load(str(model)).ir_version <= 10
    top = predict(model, [next((data / "a").iterdir())], top_k=1)[0]["top"]
    assert top[0]["class"] in ("a", "b")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_train_ort_cli_runs_without_torch(artifacts, tmp_path):
    folder, data = artifacts
    out = tmp_path / "out"
    proc = run_cli_without_torch("train_ort", ["--artifacts", str(folder), "--data", str(data), "--steps", "3",
                                               "--batch-size", "4", "--out", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events][-1] == "done" and sum(e["event"] == "step" for e in events) == 3
    assert (out / "model.onnx").is_file() and (out / "summary.json").is_file()


def test_train_ort_bad_inputs(artifacts, tmp_path):
    folder, data = artifacts
    with pytest.raises(ConfigError, match="--artifacts"):
        train_ort(tmp_path, data, tmp_path / "o", steps=1)
    result = CliRunner().invoke(train_ort_cmd, ["--artifacts", str(folder), "--data", str(tmp_path / "nope"),
                                                 "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 3 and "--data" in result.output


def _copy(folder, dst):
    import shutil

    shutil.copytree(folder, dst)
    return dst


def test_train_ort_refuses_a_damaged_or_hostile_artifacts_folder_naming_the_file(artifacts, tmp_path):
    """The training API opens models by path, so each file is checked first as predict checks a model: a tensor
    stored as external data would make onnxruntime read whatever file it names."""
    folder, data = artifacts
    bare = _copy(folder, tmp_path / "no-metadata")
    info = json.loads((bare / "meta.json").read_text())
    (bare / "meta.json").write_text(json.dumps({k: v for k, v in info.items() if k != "metadata"}))
    with pytest.raises(ConfigError, match=r"no-metadata: meta.json has no metadata object"):
        train_ort(bare, data, tmp_path / "o", steps=1)
    wrong = _copy(folder, tmp_path / "bad-size")
    info["metadata"]["edge_alast.img_size"] = "0"
    (wrong / "meta.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"meta.json: metadata edge_alast.img_size must be an integer"):
        train_ort(wrong, data, tmp_path / "o", steps=1)
    hostile = _copy(folder, tmp_path / "hostile")
    model = onnx.load(str(hostile / "training_model.onnx"))
    tensor = model.graph.initializer.add()
    tensor.name, tensor.data_type = "planted", onnx.TensorProto.FLOAT
    tensor.dims.append(4)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../../etc/shadow")
    onnx.save(model, str(hostile / "training_model.onnx"))
    with pytest.raises(ConfigError, match=r"training_model.onnx: tensor planted is stored as external data"):
        train_ort(hostile, data, tmp_path / "o", steps=1)
    (hostile / "eval_model.onnx").unlink()
    (hostile / "training_model.onnx").write_bytes((folder / "training_model.onnx").read_bytes())
    with pytest.raises(ConfigError, match=r"eval_model.onnx: no such model file"):
        train_ort(hostile, data, tmp_path / "o", steps=1)
    (hostile / "eval_model.onnx").write_bytes((folder / "eval_model.onnx").read_bytes())
    (hostile / "checkpoint").unlink()
    os.mkfifo(hostile / "checkpoint")  # onnxruntime's read of it would block for ever
    with pytest.raises(ConfigError, match=r"hostile: checkpoint is not a regular file"):
        train_ort(hostile, data, tmp_path / "o", steps=1)
    (hostile / "checkpoint").unlink()
    (hostile / "checkpoint").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"hostile: checkpoint is 0 bytes"):
        train_ort(hostile, data, tmp_path / "o", steps=1)
    os.truncate(hostile / "checkpoint", 2**31)  # sparse: no disk used
    with pytest.raises(ConfigError, match=r"hostile: checkpoint is 2147483648 bytes"):
        train_ort(hostile, data, tmp_path / "o", steps=1)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before anything was trained or written


@pytest.mark.assets
def test_ort_training_on_fashion_mnist(fashion_mnist, tmp_path):
    run = make_run(fashion_mnist / "train", tmp_path / "run", val_data=fashion_mnist / "val", steps=1)
    generate_training_artifacts(run, trainable_fraction=0.5)
    summary = train_ort(run / "ort_training", fashion_mnist / "train", tmp_path / "out",
                        val_data=fashion_mnist / "val", steps=40, batch_size=16, lr=3e-3)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert summary["val_accuracy"] > 0.4  # 4 classes: chance is 0.25
