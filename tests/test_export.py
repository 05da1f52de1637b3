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

from conftest import TINY, make_image_folder, run_cli_without_torch, tiny_model
from edge_alast import __version__
from edge_alast.cli_export import export as export_cmd
from edge_alast.cli_export import predict as predict_cmd
from edge_alast.config import TrainConfig
from edge_alast.data import Preprocess
from edge_alast.export import (ExportError, ParityError, export_onnx, export_run, load_run_model, save_model)
from edge_alast.models import create_model
from edge_alast.images import load_image
from edge_alast.predict import read_metadata, session
from edge_alast.trainer import train

TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
MODEL = "vit_tiny_patch16_224"


def make_run(data, out, val_data=None, steps=2, seed=0) -> Path:
    """A finished tiny ALaST run folder with model.safetensors (saved here: the trainer does not save it yet)."""
    config = TrainConfig(data=str(data), out=str(out), val_data=str(val_data) if val_data else None, model=MODEL,
                         model_args=dict(TINY_ARGS), img_size=32, steps=steps, batch_size=4, lr=1e-3,
                         val_fraction=0.25, seed=seed)
    summary = train(config).summary
    torch.manual_seed(seed)
    save_model(create_model(MODEL, num_classes=len(summary["classes"]), img_size=32, **TINY_ARGS), out)
    return Path(out)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "train", classes=("a", "b", "c"))
    val = make_image_folder(root / "val", classes=("a", "b", "c"), per_class=3, seed=1)
    return make_run(data, root / "run", val_data=val)


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_save_model_round_trip(run):
    model, meta = load_run_model(run)
    assert meta["classes"] == ["a", "b", "c"] and meta["img_size"] == 32 and meta["model_name"] == MODEL
    torch.manual_seed(0)
    reference = create_model(MODEL, num_classes=3, img_size=32, **TINY_ARGS).state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    assert not model.training and temp_files(run) == []


def test_export_run_parity_metadata_and_manifest(run):
    manifest = export_run(run)  # the run's own val_data (9 images) feeds the parity check
    path = run / "model.onnx"
    data = path.read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size_bytes"] == len(data)
    assert json.loads((run / "manifest.json").read_text()) == manifest
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
    assert props["edge_alast.base_model"] == MODEL and props["edge_alast.version"] == __version__
    assert json.loads(props["edge_alast.summary"])["method"] == "alast"
    assert manifest["metadata_props"] == props
    assert read_metadata(path)["class_names"] == ["a", "b", "c"]

    # dynamic batch: a batch size the exporter never saw gives PyTorch's logits
    model, _ = load_run_model(run)
    x = torch.randn(5, 3, 32, 32)
    got = session(path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)
    assert temp_files(run) == []


def test_corrupted_model_fails_parity_and_publishes_nothing(tmp_path, monkeypatch):
    import edge_alast.export as export_mod

    exporter = export_mod.onnx_bytes

    def corrupted(model, example, opset, training=False):
        broken = tiny_model()
        broken.load_state_dict(model.state_dict())
        with torch.no_grad():
            broken.head.weight.mul_(-1.0)
        return exporter(broken.eval(), example, opset, training)

    monkeypatch.setattr(export_mod, "onnx_bytes", corrupted)
    with pytest.raises(ParityError, match="max \\|logit diff\\|") as info:
        export_onnx(tiny_model(), tmp_path / "model.onnx", img_size=32, class_names=list("abcde"), mean=(0.5,) * 3,
                    std=(0.5,) * 3, base_model="tiny", profile=None, summary={})
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []  # no model.onnx, no manifest, no temp file


def test_hooked_model_is_refused(tmp_path):
    from edge_alast.patch import apply_patch

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


def test_predict_runs_without_torch(run):
    if not (run / "model.onnx").exists():
        export_run(run)
    image = next((run.parent / "val" / "b").iterdir())
    proc = run_cli_without_torch("predict", [str(run / "model.onnx"), str(image), "--top-k", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["image"] == str(image) and len(result["top"]) == 2
    assert {t["class"] for t in result["top"]} <= {"a", "b", "c"}


def test_cli_export_and_predict(run, tmp_path):
    result = CliRunner().invoke(export_cmd, [str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["manifest"]["parity"]["argmax_equal"]
    image = next((run.parent / "val" / "a").iterdir())
    result = CliRunner().invoke(predict_cmd, [str(run / "model.onnx"), str(image), "--top-k", "3"])
    assert result.exit_code == 0 and result.output.startswith(f"{image}: ")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(predict_cmd, [str(run / "model.onnx"), str(bad)])
    assert result.exit_code == 3 and "cannot read image" in result.output
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert CliRunner().invoke(export_cmd, [str(not_a_run)]).exit_code == 2
