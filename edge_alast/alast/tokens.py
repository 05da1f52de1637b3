"""Pure tensor functions for ALaST token selection (no modules, no state)."""
from __future__ import annotations

import torch


def cls_attention(qkv: torch.Tensor, num_heads: int, scale: float, q_norm=None, k_norm=None) -> torch.Tensor:
    """Class-token attention row, averaged over heads, from a block's fused qkv projection output.

    Only the class token's query is used: one row of attention, O(N*D), so the block itself keeps timm's fused
    attention kernel.

    Args:
        qkv: Output of ``attn.qkv``, shape [B, N, 3*H*hd].
        num_heads: H.
        scale: Softmax scale (timm's ``attn.scale``).
        q_norm: The attention's q normaliser (qk-norm models), applied per head as timm does.
        k_norm: The attention's k normaliser.

    Returns:
        [B, N] attention of the class token (index 0) to every token, float32.
    """
    b, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    qkv = qkv.float().reshape(b, n, 3, num_heads, head_dim)
    q = qkv[:, :1, 0].transpose(1, 2)  # [B, H, 1, hd]
    k = qkv[:, :, 1].transpose(1, 2)  # [B, H, N, hd]
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, 1, N]
    return attn.softmax(dim=-1).mean(dim=1).squeeze(1)


def select_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix_tokens: int) -> torch.Tensor:
    """Keep the prefix tokens and the ``keep`` patch tokens with the highest scores (in their original order).

    Args:
        x: Tokens [B, N, D].
        scores: Per-token scores [B, N] (prefix positions are ignored).
        keep: Patch tokens to keep.
        num_prefix_tokens: Leading tokens always kept (class, distillation, register tokens).
    """
    n_patch = x.shape[1] - num_prefix_tokens
    if keep >= n_patch:
        return x
    idx = scores[:, num_prefix_tokens:].topk(keep, dim=1).indices.sort(dim=1).values
    patches = x[:, num_prefix_tokens:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)
