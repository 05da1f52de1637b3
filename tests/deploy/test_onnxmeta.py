"""ONNX metadata: what travels in an exported model, written and read back without torch; the IR version cap."""
import json

import onnx
import pytest
from onnx import TensorProto, helper

from edge_alast import __version__
from edge_alast.deploy.onnxmeta import (MAX_IR_VERSION, METADATA_PREFIX, build_metadata, decode_metadata, image_args,
                                        limit_ir_version, read_metadata, set_metadata)
from edge_alast.errors import ConfigError

FACTS = dict(class_names=["cat", "dog"], img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
             base_model="vit_tiny_patch16_224", profile="laptop_cpu", summary={"method": "alast", "steps": 3})


def identity_model(ir_version: int = 8) -> onnx.ModelProto:
    """The smallest model onnxruntime runs: logits = input."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def test_metadata_round_trips_as_prefixed_strings():
    props = build_metadata(**FACTS, crop_pct=0.9, crop_mode="center")
    assert all(k.startswith(METADATA_PREFIX) and isinstance(v, str) for k, v in props.items())
    assert json.loads(props["edge_alast.class_names"]) == ["cat", "dog"] and props["edge_alast.profile"] == "laptop_cpu"
    decoded = decode_metadata({**props, "other.key": "kept apart"})
    assert decoded == {"class_names": ["cat", "dog"], "img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                       "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                       "base_model": "vit_tiny_patch16_224", "profile": "laptop_cpu", "version": __version__,
                       "summary": {"method": "alast", "steps": 3}}


def test_set_metadata_replaces_ours_and_keeps_other_tools_keys(tmp_path):
    model = identity_model()
    model.metadata_props.add(key="producer.note", value="kept")
    model.metadata_props.add(key="edge_alast.profile", value="stale")
    set_metadata(model, build_metadata(**FACTS))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["producer.note"] == "kept" and props["edge_alast.profile"] == "laptop_cpu"
    assert [p.key for p in model.metadata_props].count("edge_alast.profile") == 1
    onnx.save(model, str(tmp_path / "m.onnx"))
    meta = read_metadata(tmp_path / "m.onnx")  # read through onnxruntime, as predict does
    assert meta["class_names"] == ["cat", "dog"] and meta["summary"]["steps"] == 3


def test_a_model_not_exported_by_edge_alast_is_named_with_the_missing_keys(tmp_path):
    onnx.save(identity_model(), str(tmp_path / "plain.onnx"))
    with pytest.raises(ConfigError, match=r"plain.onnx: no edge-alast metadata .*edge_alast.class_names.*"
                                          r"`edge-alast export`"):
        read_metadata(tmp_path / "plain.onnx")


@pytest.mark.parametrize("written, capped", [(11, MAX_IR_VERSION), (MAX_IR_VERSION, MAX_IR_VERSION), (8, 8)])
def test_ir_version_is_capped_at_what_onnxruntime_loads(written, capped):
    model = identity_model(written)
    limit_ir_version(model)
    assert model.ir_version == capped


def test_image_args_of_a_model_from_before_the_crop_travelled_squash():
    old = decode_metadata(build_metadata(**FACTS))
    del old["crop_pct"], old["crop_mode"], old["interpolation"]
    assert image_args(old) == {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "squash"}
    new = image_args(decode_metadata(build_metadata(**FACTS, crop_pct=0.875, crop_mode="center")))
    assert (new["crop_pct"], new["crop_mode"]) == (0.875, "center")
