"""Prediction with an exported model: the execution provider chosen from what onnxruntime offers, no torch
imported, and the eval transform that travels in the model's metadata (identical top-1 to ``eval``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_alast.data.images import load_image
from edge_alast.data.loader import Preprocess
from edge_alast.deploy.export import export_run
from edge_alast.deploy.onnxmeta import read_metadata
from edge_alast.cli.deploy import predict as predict_command
from edge_alast.deploy.predict import choose_provider, predict, session
from edge_alast.errors import ConfigError
from edge_alast.runfolder import load_run_model
from tests.helpers import run_cli_without_torch

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("available, has_gpu, chosen, warns", [
    ([TRT, CUDA, CPU], True, TRT, False),
    ([CUDA, CPU], True, CUDA, False),
    ([CPU], True, CPU, True),
    ([CPU], False, CPU, False),
])
def test_auto_takes_the_best_present_and_warns_when_it_falls_back_from_a_gpu(available, has_gpu, chosen, warns):
    provider, warning = choose_provider("auto", available, has_gpu=has_gpu)
    assert provider == chosen
    assert (warning is not None) is warns
    if warns:
        assert "running on the CPU" in warning


def test_a_named_provider_that_is_missing_is_a_config_error_naming_the_build():
    with pytest.raises(ConfigError, match="--provider cuda: .*CPUExecutionProvider"):
        choose_provider("cuda", [CPU])
    assert choose_provider("cuda", [CUDA, CPU]) == (CUDA, None)
    assert choose_provider("cpu", [CUDA, CPU]) == (CPU, None)


# ---------------------------------------------------------------- without torch

def test_predict_runs_without_torch(finished_run):
    if not (finished_run / "model.onnx").exists():
        export_run(finished_run)
    image = next((finished_run.parent / "val" / "b").iterdir())
    proc = run_cli_without_torch("predict", [str(finished_run / "model.onnx"), str(image), "--top-k", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["image"] == str(image) and len(result["top"]) == 2
    assert result["provider"] == "CPUExecutionProvider"  # --provider auto on a host without an NVIDIA GPU
    assert {t["class"] for t in result["top"]} <= {"a", "b", "c"}


# ---------------------------------------------------------------- the eval transform travels with the model

def _photo_folder(root: Path) -> list[tuple[Path, int]]:
    """Non-square photos of classes a, b, c; two stored in sensor orientation with an EXIF Orientation tag."""
    rng = np.random.default_rng(7)
    samples = []
    for label, cls in enumerate(("a", "b", "c")):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate([(40, 64), (72, 48), (50, 50)]):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(pixels).save(path)
            samples.append((path, label))
        exif = Image.Exif()
        exif[0x0112] = 6 + 2 * (label % 2)  # 6 or 8: stored turned by a quarter
        path = root / cls / "rotated.jpg"
        Image.fromarray(rng.integers(0, 256, size=(96, 60, 3), dtype=np.uint8)).save(path, quality=90, exif=exif)
        samples.append((path, label))
    return sorted(samples)


def test_predict_and_eval_give_identical_top1_with_the_models_eval_transform(finished_run, tmp_path):
    from edge_alast.cli.main import main
    from edge_alast.data.loader import load_batch

    if not (finished_run / "model.onnx").exists():
        export_run(finished_run)
    meta = read_metadata(finished_run / "model.onnx")
    assert (meta["crop_pct"], meta["crop_mode"]) == (0.9, "center")  # vit_tiny_patch16_224's data config
    model, run_meta = load_run_model(finished_run)
    preprocess = Preprocess.from_meta(run_meta)
    assert preprocess.eval_transform == {"crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"}
    samples = _photo_folder(tmp_path / "photos")
    paths = [str(p) for p, _ in samples]

    proc = run_cli_without_torch("predict", [str(finished_run / "model.onnx"), *paths, "--top-k", "3", "--json"])
    assert proc.returncode == 0, proc.stderr
    predicted = {r["image"]: r["top"] for r in map(json.loads, proc.stdout.strip().splitlines())}
    x, labels = load_batch(samples, range(len(samples)), preprocess)  # what `eval` and the trainer feed the model
    with torch.no_grad():
        probs = torch.softmax(model(x), -1).numpy()
    for path, p in zip(paths, probs):
        assert predicted[path][0]["index"] == int(p.argmax()), path
        assert predicted[path][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    top1 = np.array([predicted[p][0]["index"] for p in paths])

    result = CliRunner().invoke(main, ["eval", str(finished_run), "--data", str(tmp_path / "photos"), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output.strip().splitlines()[-1])
    assert evaluated["images"] == len(samples) and evaluated["skipped"] == []
    assert evaluated["accuracy"] == pytest.approx(float((top1 == labels.numpy()).mean()), abs=1e-12)


def test_models_from_before_the_eval_transform_travelled_still_squash(finished_run, tmp_path):
    from edge_alast.deploy.predict import predict, softmax

    if not (finished_run / "model.onnx").exists():
        export_run(finished_run)
    proto = onnx.load(str(finished_run / "model.onnx"))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ("edge_alast.crop_pct",
                                                                             "edge_alast.crop_mode")]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    meta = read_metadata(tmp_path / "old.onnx")
    assert "crop_pct" not in meta
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(40, 96, 3), dtype=np.uint8)).save(wide)
    squashed = load_image(wide, 32, meta["mean"], meta["std"])  # what edge-alast did before crop_pct
    expected = softmax(session(tmp_path / "old.onnx").run(None, {"input": squashed[None]})[0])[0]
    [got] = predict(tmp_path / "old.onnx", [wide], top_k=5)
    assert {t["index"]: t["probability"] for t in got["top"]} == pytest.approx(
        {i: float(expected[i]) for i in range(3)}, abs=1e-6)

    summary = json.loads((finished_run / "summary.json").read_text())  # an old run folder: no eval_transform recorded
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old_run / name).write_bytes((finished_run / name).read_bytes())
    (old_run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "eval_transform"}))
    assert {k: load_run_model(old_run)[1][k] for k in ("crop_pct", "crop_mode")} == {"crop_pct": 1.0,
                                                                                   "crop_mode": "squash"}


# ---------------------------------------------------------------- only self-contained models, bounded metadata

def _classifier(path: Path, side: int = 16, external: str | None = None, **meta_overrides) -> Path:
    """A small image classifier (mean colour -> 2 logits) with edge-alast metadata; ``external``: its weight is
    stored as external data at that location instead of inside the file."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edge_alast.deploy.onnxmeta import build_metadata, set_metadata

    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    if external is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=external)
        weight.external_data.add(key="length", value="24")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = build_metadata(class_names=["cat", "dog"], img_size=side, mean=(0.5,) * 3, std=(0.25,) * 3,
                           base_model=None, profile=None, summary=None)
    props.update({f"edge_alast.{k}": v for k, v in meta_overrides.items()})
    set_metadata(model, props)
    path.write_bytes(model.SerializeToString())
    return path


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((20, 20, 3), 200, dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("location", ["secret.bin", "/etc/passwd", "../secret.bin"])
def test_a_model_with_external_data_is_refused_before_onnxruntime_reads_the_file(tmp_path, location):
    from edge_alast.deploy.predict import predict

    (tmp_path / "secret.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())  # loadable: ort would read it
    (tmp_path / "models").mkdir()
    model = _classifier(tmp_path / ("models/m.onnx" if location.startswith("..") else "m.onnx"), external=location)
    with pytest.raises(ConfigError, match=rf"m.onnx: tensor w is stored as external data \('{re.escape(location)}'\)"):
        predict(model, [_image(tmp_path)])
    result = CliRunner().invoke(predict_command, [str(model), str(_image(tmp_path))])
    assert result.exit_code == 2 and "external data" in result.output and "Traceback" not in result.output


def test_the_self_contained_control_model_predicts(tmp_path):
    from edge_alast.deploy.predict import predict

    (top,) = predict(_classifier(tmp_path / "m.onnx"), [_image(tmp_path)], top_k=1)
    assert top["top"][0]["class"] in ("cat", "dog")


@pytest.mark.parametrize("content, message", [
    (b"", "empty file, not an ONNX model"),
    (b"\x00garbage\xff" * 100, "not an ONNX model"),
    (b"\x08\x07", "not an ONNX model (no IR version or graph outputs)"),  # parses: an IR version, no graph
])
def test_empty_or_garbage_model_files_are_exit_2_naming_the_file(tmp_path, content, message):
    model = tmp_path / "bad.onnx"
    model.write_bytes(content)
    result = CliRunner().invoke(predict_command, [str(model), str(_image(tmp_path))])
    assert result.exit_code == 2, result.output
    assert f"bad.onnx: {message}" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("override, message", [
    ({"img_size": "60000"}, "img_size must be an integer in [8, 4096]"),
    ({"img_size": "true"}, "img_size must be an integer"),
    ({"mean": "[0.5]"}, "mean must be 3 finite numbers"),
    ({"mean": "[0.5, 0.5, NaN]"}, "mean must be 3 finite numbers"),
    ({"std": "[0.25, 0, 0.25]"}, "std must be > 0 per channel"),
    ({"std": "{not json"}, "std is not valid JSON"),
    ({"class_names": "[\"cat\"]"}, "class_names must name the model's 2 outputs"),
    ({"class_names": "[1, 2]"}, "class_names must be a list of 1 to"),
    ({"class_names": json.dumps(["x" * 300, "y"])}, "class_names must be a list"),
    ({"crop_pct": "7"}, "crop_pct must be a number in (0, 1]"),
    ({"crop_mode": "explode"}, "crop_mode must be one of"),
    ({"summary": "x" * (2 << 20)}, "summary holds 2097152 characters (at most 1048576)"),
])
def test_bad_metadata_is_exit_2_naming_the_file_and_field(tmp_path, override, message):
    model = _classifier(tmp_path / "m.onnx", **override)
    result = CliRunner().invoke(predict_command, [str(model), str(_image(tmp_path))])
    assert result.exit_code == 2, result.output
    assert "m.onnx: metadata edge_alast." in result.output and message in result.output
    assert "Traceback" not in result.output


def test_predict_names_each_unreadable_file_and_classifies_the_others(finished_run, tmp_path):
    from edge_alast.cli.deploy import predict as predict_cmd

    if not (finished_run / "model.onnx").exists():
        export_run(finished_run)
    good = next((finished_run.parent / "val" / "a").iterdir())
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9")
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 5000)).save(strip)  # over the default aspect-ratio limit: refused from its header
    results = predict(finished_run / "model.onnx", [garbage, good, strip])
    assert [r["image"] for r in results] == [str(garbage), str(good), str(strip)]
    assert "cannot read image" in results[0]["error"] and "--max-aspect-ratio" in results[2]["error"]
    assert len(results[1]["top"]) == 3
    result = CliRunner().invoke(predict_cmd, [str(finished_run / "model.onnx"), str(garbage), str(good), "--json"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["image"] == str(garbage) and "error" in lines[0] and lines[1]["top"]
