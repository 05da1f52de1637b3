"""Token selection as pure tensor functions: the class-token attention row and keeping the top-k patch tokens."""
import pytest
import torch
from torch.testing import assert_close

from edge_alast.alast.tokens import cls_attention, select_tokens
from tests.helpers import tiny_model


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "vit_qknorm_reg"])
def test_cls_attention_matches_explicit_attention(kind):
    model = tiny_model(kind).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 17 + model.num_prefix_tokens - 1, 32)
    qkv = attn.qkv(x)
    b, n, _ = qkv.shape
    q, k, _v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # timm's non-fused path
    assert_close(cls_attention(qkv, attn.num_heads, attn.scale, attn.q_norm, attn.k_norm), full[:, :, 0].mean(1))


def test_select_tokens_keeps_prefix_and_topk_in_order():
    x = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7, 1).repeat(1, 1, 3)
    scores = torch.tensor([[9, 0.1, 0.5, 0.2, 0.9, 0.3, 0.8], [9, 0.9, 0.1, 0.8, 0.2, 0.7, 0.3]])
    out = select_tokens(x, scores, keep=3, num_prefix_tokens=1)
    assert out[0, :, 0].tolist() == [0, 2, 4, 6]
    assert out[1, :, 0].tolist() == [7, 8, 10, 12]
    assert select_tokens(x, scores, keep=6, num_prefix_tokens=1) is x


def test_select_tokens_keeps_every_prefix_token_and_routes_gradients_to_kept_tokens_only():
    x = torch.randn(1, 8, 4, requires_grad=True)
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.3]])  # 3 prefix tokens score low: kept anyway
    out = select_tokens(x, scores, keep=2, num_prefix_tokens=3)
    assert_close(out, x[:, [0, 1, 2, 3, 5]])
    out.sum().backward()
    assert x.grad[0, :, 0].tolist() == [1, 1, 1, 1, 0, 1, 0, 0]


def test_cls_attention_is_a_distribution_over_tokens():
    attn = tiny_model().blocks[0].attn
    row = cls_attention(attn.qkv(torch.randn(3, 17, 32)), attn.num_heads, attn.scale)
    assert row.shape == (3, 17) and row.dtype == torch.float32
    assert_close(row.sum(-1), torch.ones(3))
    assert (row >= 0).all()
