"""ONNX export: saved weights round-trip, parity gate, metadata, manifest, atomic publishing, predict without torch."""
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_alast import __version__
from edge_alast.cli.deploy import export as export_cmd
from edge_alast.cli.deploy import predict as predict_cmd
from edge_alast.data.loader import Preprocess
from edge_alast.deploy.export import ExportError, ParityError, export_onnx, export_run
from edge_alast.model.build import create_model
from edge_alast.data.images import load_image
from edge_alast.deploy.onnxmeta import read_metadata
from edge_alast.deploy.predict import session
from edge_alast.runfolder import load_run_model
from tests.helpers import TINY_ARGS, TINY_MODEL, run_cli_without_torch, tiny_model

def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_save_model_round_trip(finished_run):
    model, meta = load_run_model(finished_run)
    assert meta["classes"] == ["a", "b", "c"] and meta["img_size"] == 32 and meta["model_name"] == TINY_MODEL
    torch.manual_seed(0)
    reference = create_model(TINY_MODEL, num_classes=3, img_size=32, **TINY_ARGS).state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    assert not model.training and temp_files(finished_run) == []


def test_export_run_parity_metadata_and_manifest(finished_run):
    manifest = export_run(finished_run)  # the run's own val_data (9 images) feeds the parity check
    path = finished_run / "model.onnx"
    data = path.read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size_bytes"] == len(data)
    assert json.loads((finished_run / "manifest.json").read_text()) == manifest
    parity = manifest["parity"]
    assert parity["source"] == "images" and parity["images"] == 9
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_equal"]
    assert 0.0 <= manifest["formats"]["fp32"]["accuracy"] <= 1.0

    proto = onnx.load(str(path))
    assert proto.ir_version <= 10 and proto.opset_import[0].version == 17
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["edge_alast.class_names"]) == ["a", "b", "c"]
    assert json.loads(props["edge_alast.img_size"]) == 32
    assert len(json.loads(props["edge_alast.mean"])) == 3 and len(json.loads(props["edge_alast.std"])) == 3
    assert props["edge_alast.base_model"] == TINY_MODEL and props["edge_alast.version"] == __version__
    assert json.loads(props["edge_alast.summary"])["method"] == "alast"
    assert manifest["metadata_props"] == props
    assert read_metadata(path)["class_names"] == ["a", "b", "c"]

    # dynamic batch: a batch size the exporter never saw gives PyTorch's logits
    model, _ = load_run_model(finished_run)
    x = torch.randn(5, 3, 32, 32)
    got = session(path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)
    assert temp_files(finished_run) == []


def test_streamed_export_is_one_ordinary_onnx_file_with_folded_weights(tmp_path):
    """write_onnx appends each initializer as its own serialised fragment: the file must still be a single, valid
    ONNX model (checker, onnxruntime, metadata), every weight an initializer (none left as a graph input, so
    onnxruntime may fold and prepack them), no Transpose left over a weight, and the same logits as PyTorch and as
    the exporter's own all-in-memory export."""
    from edge_alast.deploy.export import INPUT_NAME, onnx_bytes, write_onnx

    model = tiny_model().eval()
    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / "m.onnx"
    ir_version = write_onnx(model, x[:2], 17, path, {"edge_alast.probe": "1"})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == ir_version <= 10
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    initializers = {t.name for t in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len([t for t in proto.graph.initializer if len(t.dims) == 2]) >= len(linear)  # each Linear's weight
    assert {p.key: p.value for p in proto.metadata_props} == {"edge_alast.probe": "1"}
    got = session(path).run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)
    in_memory = session(onnx_bytes(model, x[:2], 17)).run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(got, in_memory, atol=1e-6)


def test_export_error_names_graph_inputs_that_are_not_weights(tmp_path, monkeypatch):
    import edge_alast.deploy.export as export_mod
    from edge_alast.deploy.export import write_onnx

    model = tiny_model().eval()
    graph_only = export_mod._graph_only

    def extra_input(*args):
        proto = graph_only(*args)
        proto.graph.input.add().CopyFrom(onnx.helper.make_tensor_value_info("mystery", onnx.TensorProto.FLOAT, [1]))
        return proto

    monkeypatch.setattr(export_mod, "_graph_only", extra_input)
    with pytest.raises(ExportError, match="mystery"):
        write_onnx(model, torch.randn(2, 3, 32, 32), 17, tmp_path / "m.onnx", {})


def test_corrupted_model_fails_parity_and_publishes_nothing(tmp_path, monkeypatch):
    import edge_alast.deploy.export as export_mod

    exporter = export_mod.write_onnx

    def corrupted(model, example, opset, path, meta_props):
        broken = tiny_model()
        broken.load_state_dict(model.state_dict())
        with torch.no_grad():
            broken.head.weight.mul_(-1.0)
        return exporter(broken.eval(), example, opset, path, meta_props)

    monkeypatch.setattr(export_mod, "write_onnx", corrupted)
    with pytest.raises(ParityError, match="max \\|logit diff\\|") as info:
        export_onnx(tiny_model(), tmp_path / "model.onnx", img_size=32, class_names=list("abcde"), mean=(0.5,) * 3,
                    std=(0.5,) * 3, base_model="tiny", profile=None, summary={})
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []  # no model.onnx, no manifest, no temp file


def test_hooked_model_is_refused(tmp_path):
    from edge_alast.alast.patch import apply_patch

    model = tiny_model()
    handle = apply_patch(model)
    with pytest.raises(ExportError, match="handle.remove"):
        export_onnx(model, tmp_path / "m.onnx", img_size=32, class_names=list("abcde"), mean=(0.5,) * 3,
                    std=(0.5,) * 3, base_model="tiny", profile=None, summary={})
    handle.remove()
    export_onnx(model, tmp_path / "m.onnx", img_size=32, class_names=list("abcde"), mean=(0.5,) * 3,
                std=(0.5,) * 3, base_model="tiny", profile=None, summary={})
    assert (tmp_path / "m.onnx").is_file()


def test_fp16_and_int8_formats(tmp_path):
    x = torch.randn(6, 3, 32, 32)
    manifest = export_onnx(tiny_model(), tmp_path / "model.onnx", img_size=32, class_names=list("abcde"),
                           mean=(0.5,) * 3, std=(0.5,) * 3, base_model="tiny", profile="laptop_cpu", summary={},
                           parity_images=x, parity_labels=[0, 1, 2, 3, 4, 0], formats=("fp32", "fp16", "int8"))
    for fmt, name in (("fp16", "model.fp16.onnx"), ("int8", "model.int8.onnx")):
        entry = manifest["formats"][fmt]
        data = (tmp_path / name).read_bytes()
        assert entry["file"] == name and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert {"accuracy", "latency_ms_batch1", "max_abs_diff_vs_pytorch"} <= set(entry)
        assert read_metadata(tmp_path / name)["profile"] == "laptop_cpu"
    assert temp_files(tmp_path) == []


def test_numpy_preprocessing_matches_training(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, size=(20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., 0], mode="L").convert("P").save(tmp_path / "b.png")
    pre = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for name in ("a.png", "b.png"):
        ours = load_image(tmp_path / name, 32, pre.mean, pre.std)
        np.testing.assert_allclose(ours, pre(tmp_path / name).numpy(), atol=1e-6)


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


def test_cli_export_and_predict(finished_run, tmp_path):
    result = CliRunner().invoke(export_cmd, [str(finished_run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["manifest"]["parity"]["argmax_equal"]
    image = next((finished_run.parent / "val" / "a").iterdir())
    result = CliRunner().invoke(predict_cmd, [str(finished_run / "model.onnx"), str(image), "--top-k", "3"])
    assert result.exit_code == 0 and result.output.startswith(f"{image}: ")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(predict_cmd, [str(finished_run / "model.onnx"), str(bad)])
    assert result.exit_code == 3 and "cannot read image" in result.output
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert CliRunner().invoke(export_cmd, [str(not_a_run)]).exit_code == 2


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
