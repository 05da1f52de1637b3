"""Parameter names: every parameter of a timm ViT is exactly one of embedding, block, final norm or head."""
import pytest

from edge_alast.model.names import block_index, is_embedding, is_final_norm, is_head
from tests.helpers import TINY, TINY_MODELS


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_every_parameter_belongs_to_exactly_one_part(kind):
    names = [n for n, _ in TINY_MODELS[kind]().named_parameters()]
    for name in names:
        parts = [is_embedding(name), block_index(name) is not None, is_final_norm(name), is_head(name)]
        assert sum(parts) == 1, (name, parts)
    assert {block_index(n) for n in names} - {None} == set(range(TINY["depth"]))
    assert any(is_final_norm(n) for n in names)  # norm, or fc_norm with average pooling
    assert any(is_head(n) for n in names)


def test_block_index():
    assert block_index("blocks.11.mlp.fc1.weight") == 11
    assert block_index("blocks.2.attn.qkv.lora_A") == 2
    assert block_index("blocks") is None and block_index("head.weight") is None and block_index("norm_pre.weight") is None
