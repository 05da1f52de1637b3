"""Where the ONNX Runtime training build is absent (aarch64, or plain onnxruntime), export --format ort-training and
train-ort exit 2 naming the cause; nothing else needs that build."""
from __future__ import annotations

import importlib.util
import types

import pytest
from click.testing import CliRunner

from edge_alast.cli.deploy import export as export_cmd
from edge_alast.cli.deploy import train_ort as train_ort_cmd
from edge_alast.deploy.ort_training import require_training_build
from edge_alast.errors import ConfigError


@pytest.fixture
def plain_onnxruntime(monkeypatch, tmp_path):
    """onnxruntime as the plain build installs it: a package without ``training/api``."""
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "onnxruntime":
            return types.SimpleNamespace(origin=str(tmp_path / "onnxruntime" / "__init__.py"))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_the_training_build_is_found_here():
    require_training_build("train-ort")  # the x86_64 venv has onnxruntime-training-cpu


def test_plain_onnxruntime_is_named_as_the_cause(plain_onnxruntime):
    with pytest.raises(ConfigError, match="train-ort needs the x86_64 onnxruntime-training build.*plain onnxruntime"):
        require_training_build("train-ort")


def test_train_ort_exits_2_without_the_training_build(plain_onnxruntime, tmp_path):
    result = CliRunner().invoke(train_ort_cmd, ["--artifacts", str(tmp_path), "--data", str(tmp_path), "--steps", "1",
                                                "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "needs the x86_64 onnxruntime-training build" in result.output


def test_export_ort_training_exits_2_without_the_training_build(plain_onnxruntime, tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(export_cmd, [str(tmp_path / "run"), "--format", "ort-training"])
    assert result.exit_code == 2
    assert "export --format ort-training needs the x86_64 onnxruntime-training build" in result.output
