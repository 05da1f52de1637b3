"""FLOP accounting for a training step, from ``torch.utils.flop_counter.FlopCounterMode``.

A step's FLOPs depend on the batch size, the tokens each block sees and which parameters need gradients. Instead
of running the counter over every training step (it slows the step and nearly every ALaST step has a new shape),
each block is counted once per (tokens, backward kind) on a ``meta``-device copy -- no memory, no compute -- and a
step's total is the sum over its blocks. Matmul and attention FLOPs are exactly linear in the batch size, so
counts are taken at batch 1 and scaled.

Backward kinds of a block in a step (autograd only computes what is needed):
  ``fwd``      below the lowest trainable block: forward only.
  ``weight``   the lowest trainable block: weight grads, no input grad (nothing below needs one).
  ``input``    a frozen block above a trainable one: input grads only, to reach the blocks below.
  ``both``     a trainable block above another trainable block: weight and input grads.

torch 2.13's counter has no formula for the CPU flash-attention kernel that timm's fused attention runs on CPU;
``register_cpu_attention_formulas`` adds it (same formula as the CUDA flash kernel). On the meta device SDPA
takes the math path (plain bmm, no score recomputation in backward), so while counting, SDPA is routed to the
CPU flash op, which has meta kernels: the meta count then equals what a CPU training step runs.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from .trainable import TrainableSet

KINDS = ("fwd", "weight", "input", "both")


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                       out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_attention_formulas() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention forward and backward ops (idempotent)."""
    aten = torch.ops.aten
    pairs = (
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), _cpu_flash_attention_flop),
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
         _cpu_flash_attention_backward_flop),
    )
    for op, formula in pairs:
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


register_cpu_attention_formulas()


def block_kinds(trainable: Sequence[bool], train_below: bool = False) -> list[str]:
    """Backward kind of each block for a step (see module docstring).

    Args:
        trainable: Per block, whether its parameters train this step.
        train_below: Whether something below block 0 (the embeddings) trains, so every block must pass grads down.
    """
    kinds = []
    grad_below = train_below  # does anything at or below this point need gradients?
    for t in trainable:
        if t:
            kinds.append("both" if grad_below else "weight")
            grad_below = True
        else:
            kinds.append("input" if grad_below else "fwd")
    # A block above every trainable block still runs backward (the loss depends on it) iff anything below trains.
    return kinds


def stores_activations(trainable: Sequence[bool], train_below: bool = False) -> list[bool]:
    """Per block, whether it stores activations for backward (any kind but ``fwd``): the blocks whose
    recomputation saves memory. The one definition the mechanism, the FLOP counter and the planner share."""
    return [kind != "fwd" for kind in block_kinds(trainable, train_below)]


@contextmanager
def _sdpa_as_cpu_flash():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_flops(module: nn.Module, inputs: Sequence[torch.Tensor], kind: str, recompute: bool = False,
                trainable: Sequence[bool] | None = None) -> int:
    """FLOPs of one forward (+ backward of the given kind) of ``module`` on ``inputs``.

    With ``recompute`` the module runs under non-reentrant ``torch.utils.checkpoint`` as the mechanism runs it, so
    the re-run forward in backward is counted as torch really runs it (it stops after the last saved tensor it
    needs, e.g. skipping the block's final matmul). ``trainable`` (per parameter, default all) says which
    parameters a weight-gradient kind trains: a LoRA block trains its adapters, not its base weights.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    need_weight = kind in ("weight", "both")
    need_input = kind in ("input", "both")
    params = list(module.parameters())
    for p, t in zip(params, trainable if trainable is not None else [True] * len(params)):
        p.requires_grad_(need_weight and bool(t))
    inputs = [x.detach().requires_grad_(need_input) if x.is_floating_point() else x for x in inputs]
    with FlopCounterMode(display=False) as counter, _sdpa_as_cpu_flash():
        out = checkpoint(module, *inputs, use_reentrant=False) if recompute else module(*inputs)
        if out.requires_grad:
            out.float().sum().backward()
    return int(counter.get_total_flops())


class StepFlopCounter:
    """Counts forward+backward FLOPs of a training step of a timm ViT for the step's actual shapes."""

    def __init__(self, model: nn.Module, trainable: TrainableSet | None = None):
        """``trainable``: what can ever train (default: what is marked ``requires_grad`` now); a block that trains
        gets weight gradients for its parameters in this set (its adapters, for LoRA)."""
        trainable = trainable or TrainableSet.from_flags(model)
        # Meta copies hold no storage, so keeping them costs no memory and counting on them costs no compute.
        self._blocks = [copy.deepcopy(b).to("meta") for b in model.blocks]
        self._trainable = [trainable.block_flags(model, i) for i in range(len(self._blocks))]
        self._stem = copy.deepcopy(model.patch_embed).to("meta")
        patch = model.patch_embed.patch_size
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch)
        # DeiT's distilled models have a second head on the distillation token.
        self._heads = [copy.deepcopy(h).to("meta") for h in (model.head, getattr(model, "head_dist", None))
                       if h is not None]
        self._dim = model.num_features if hasattr(model, "num_features") else model.embed_dim
        self._cache: dict[tuple, int] = {}

    def _cached(self, key: tuple, fn) -> int:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def block_flops(self, index: int, tokens: int, kind: str, recompute: bool = False) -> int:
        """FLOPs of block ``index`` at batch 1 with ``tokens`` input tokens (recomputation included if asked)."""
        x = torch.empty(1, tokens, self._blocks[index].norm1.normalized_shape[0], device="meta")
        recompute = recompute and kind != "fwd"  # a block that stores nothing has nothing to recompute
        return self._cached(("block", index, tokens, kind, recompute),
                            lambda: count_flops(self._blocks[index], [x], kind, recompute,
                                                trainable=self._trainable[index]))

    def step_flops(
        self,
        batch_size: int,
        img_size: int,
        tokens_per_block: Sequence[int],
        trainable: Sequence[bool],
        train_embeddings: bool = False,
        train_head: bool = True,
        train_final_norm: bool = True,
        keep_ratios: Sequence[float] | None = None,
        recompute: Sequence[bool] | None = None,
    ) -> int:
        """Forward+backward FLOPs of one step.

        Args:
            batch_size: Images in the step.
            img_size: Input side in pixels.
            tokens_per_block: Tokens (prefix included) entering each block.
            trainable: Per block, whether its parameters train.
            train_embeddings: Whether the patch embedding trains.
            train_head: Whether the classifier head trains.
            train_final_norm: Whether the norm before the head trains (then the head passes input grads).
            keep_ratios: Per block keep ratio; blocks below 1 also pay for the class-token attention row that
                ranks their tokens (one [1, hd] x [hd, N] product per head).
            recompute: Per block, whether its activations are recomputed: a block that runs backward then re-runs
                (most of) its forward.
        """
        kinds = block_kinds(trainable, train_below=train_embeddings)
        total = 0
        for i, (n, kind) in enumerate(zip(tokens_per_block, kinds)):
            total += self.block_flops(i, int(n), kind, recompute=bool(recompute is not None and recompute[i]))
            if keep_ratios is not None and keep_ratios[i] < 1.0:
                attn = self._blocks[i].attn
                total += 2 * attn.num_heads * (attn.qkv.out_features // (3 * attn.num_heads)) * int(n)
        img = torch.empty(1, 3, img_size, img_size, device="meta")
        stem_kind = "weight" if train_embeddings else "fwd"
        total += self._cached(("stem", img_size, stem_kind), lambda: count_flops(self._stem, [img], stem_kind))
        grads_below_head = train_final_norm or (bool(kinds) and kinds[-1] != "fwd")
        if train_head:
            head_kind = "both" if grads_below_head else "weight"
        else:
            head_kind = "input" if grads_below_head else "fwd"
        feat = torch.empty(1, self._dim, device="meta")
        for j, head in enumerate(self._heads):
            total += self._cached(("head", j, head_kind), lambda: count_flops(head, [feat], head_kind))
        return total * int(batch_size)
