"""The record of what can ever train: built from the method, read by the patch, FLOP counter and optimizer."""
import pytest

from edge_alast.adapters.lightpeft import add_masks
from edge_alast.adapters.lora import LoraConfig, apply_lora
from edge_alast.methods import METHODS
from edge_alast.model.names import is_embedding, is_head
from edge_alast.model.trainable import TrainableSet
from tests.helpers import tiny_model


def built(method):
    model = tiny_model()
    spec = METHODS[method]
    if spec.lora:
        apply_lora(model, LoraConfig(r=2))
    if spec.light_peft:
        add_masks(model)
    return model, spec


@pytest.mark.parametrize("method", list(METHODS))
def test_what_each_method_trains(method):
    model, spec = built(method)
    record = TrainableSet.for_method(model, spec)
    names = dict(model.named_parameters())
    blocks = {n for n in record.names if n.startswith("blocks.")}
    outside = record.names - blocks
    if spec.blocks == "none":
        assert not blocks and outside == {n for n in names if is_head(n)}
    elif spec.blocks == "all":
        assert blocks == {n for n in names if n.startswith("blocks.")}
    else:
        assert blocks and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "mask") for n in blocks)
    assert any(is_embedding(n) for n in outside) == (method == "full")
    assert record.embeddings == (method == "full") and record.final_norm == (method != "head")


def test_train_embeddings_adds_them_except_for_head_only():
    model, spec = built("alast")
    assert TrainableSet.for_method(model, spec, train_embeddings=True).embeddings
    model, spec = built("head")
    assert not TrainableSet.for_method(model, spec, train_embeddings=True).embeddings


def test_block_flags_and_apply():
    model, spec = built("lora")
    record = TrainableSet.for_method(model, spec)
    flags = record.block_flags(model, 1)
    assert flags == ["lora_" in n for n, _ in model.blocks[1].named_parameters()]
    record.apply(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == record.names
    assert TrainableSet.from_flags(model).names == record.names
    assert [n for n, _ in record.parameters(model)] == [n for n, _ in model.named_parameters() if n in record.names]


def test_full_can_freeze_its_embeddings_to_compare_like_with_like():
    model, spec = built("full")
    assert TrainableSet.for_method(model, spec).embeddings  # full's default
    record = TrainableSet.for_method(model, spec, train_embeddings=False)
    assert not record.embeddings and not any(is_embedding(n) for n in record.names)
    assert TrainableSet.for_method(model, spec, freeze_below=1).embeddings is False
