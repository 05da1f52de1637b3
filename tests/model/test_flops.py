"""FLOP accounting: the per-block composition equals FlopCounterMode over a real training step."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_alast.model.flops import StepFlopCounter, block_kinds
from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan
from tests.helpers import tiny_model


def test_block_kinds():
    assert block_kinds([False, True, False, True]) == ["fwd", "weight", "input", "both"]
    assert block_kinds([False, False]) == ["fwd", "fwd"]
    assert block_kinds([False, True], train_below=True) == ["input", "both"]


def test_cpu_flash_attention_is_counted():
    block = tiny_model().blocks[0]
    x = torch.randn(2, 17, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        block(x).sum().backward()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    if block.attn.fused_attn:
        assert any("flash_attention_for_cpu" in op for op in ops), ops
        assert any("flash_attention_for_cpu_backward" in op for op in ops), ops


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "vit_qknorm_reg"])
@pytest.mark.parametrize("trainable,keep,train_emb", [
    ((True, True, True), 1.0, True),        # full fine-tuning
    ((False, True, True), 0.5, False),      # ALaST-like: lowest block frozen, tokens dropped
    ((True, False, True), 0.75, False),     # frozen block between trainable ones
    ((False, False, False), 1.0, False),    # head only
])
def test_composed_step_flops_equal_counted_real_step(kind, trainable, keep, train_emb):
    model = tiny_model(kind).train()
    counter = StepFlopCounter(model)
    for name, p in model.named_parameters():
        if not name.startswith("blocks."):
            p.requires_grad_(train_emb or name.startswith(("head", "norm", "fc_norm")))
    handle = apply_patch(model)
    plan = StepPlan((keep,) * 3, trainable)
    handle.set_plan(plan)
    batch = 3
    with FlopCounterMode(display=False) as real:
        model(torch.randn(batch, 3, 32, 32)).sum().backward()
    composed = counter.step_flops(batch, 32, handle.tokens_in, plan.trainable, train_embeddings=train_emb, train_final_norm=True,
                                  keep_ratios=plan.keep_ratios)
    assert composed == real.get_total_flops()


def test_counts_are_cached_per_shape():
    counter = StepFlopCounter(tiny_model())
    a = counter.step_flops(4, 32, [17, 9, 5], (False, True, True), keep_ratios=(0.5,) * 3)
    cached = len(counter._cache)
    b = counter.step_flops(8, 32, [17, 9, 5], (False, True, True), keep_ratios=(0.5,) * 3)
    assert b == 2 * a and len(counter._cache) == cached


def test_recomputed_blocks_pay_a_second_forward():
    model = tiny_model().train()
    counter = StepFlopCounter(model)
    for name, p in model.named_parameters():
        if not name.startswith("blocks."):
            p.requires_grad_(name.startswith(("head", "norm")))
    handle = apply_patch(model)
    plan = StepPlan((1.0,) * 3, (False, True, True), recompute=(True, True, False))
    handle.set_plan(plan)
    with FlopCounterMode(display=False) as real:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    composed = counter.step_flops(2, 32, handle.tokens_in, plan.trainable, keep_ratios=plan.keep_ratios,
                                  recompute=plan.recompute)
    # block 0 is below the lowest trainable block: it stores nothing, so it is not recomputed
    assert composed == real.get_total_flops()
    plain = counter.step_flops(2, 32, handle.tokens_in, plan.trainable, keep_ratios=plan.keep_ratios)
    assert plain < composed < plain + 2 * counter.block_flops(1, 17, "fwd") + 1  # re-run stops before fc2
