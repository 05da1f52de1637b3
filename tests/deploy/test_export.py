"""ONNX export: parity gate, metadata, manifest, formats, atomic publishing."""
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edge_alast import __version__
from edge_alast.cli.deploy import export as export_cmd
from edge_alast.cli.deploy import predict as predict_cmd
from edge_alast.deploy.export import ExportError, ParityError, export_onnx, export_run
from edge_alast.deploy.onnxmeta import read_metadata
from edge_alast.deploy.predict import session
from edge_alast.runfolder import load_run_model
from tests.helpers import TINY_MODEL, tiny_model


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


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
