"""The cost model: predicted saved activations against bytes counted in a real step; adapters' optimizer state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan
from edge_alast.device.calibration import saved_tensor_bytes
from edge_alast.device.costmodel import CostModel
from tests.helpers import TINY, cost_for, tiny_model, trainable_for

IMG = TINY["img_size"]


def counted_step_bytes(model, plan: StepPlan, batch: int, method: str) -> tuple[int, list[int]]:
    """Saved-tensor bytes of one real training step of ``model`` under ``plan`` (parameters left out)."""
    for n, p in model.named_parameters():
        if not n.startswith("blocks."):
            p.requires_grad_(n.startswith("head.") or method != "head")
            if n.startswith(("patch_embed.", "cls_token", "pos_embed")):
                p.requires_grad_(method == "full")
    handle = apply_patch(model)
    try:
        handle.set_plan(plan)
        model.train()
        x = torch.randn(batch, 3, IMG, IMG)
        y = torch.randint(0, TINY["num_classes"], (batch,))
        params = list(model.parameters())
        saved, loss = saved_tensor_bytes(lambda: F.cross_entropy(model(x), y), exclude=params)
        tokens = list(handle.tokens_in)
        loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return saved, tokens


PLANS = {
    "full": ("full", StepPlan((1.0,) * 3, (True,) * 3)),
    "alast_dropped": ("alast", StepPlan((0.5, 0.75, 0.6), (True, True, False))),
    "frozen_between": ("alast", StepPlan((0.9, 1.0, 0.5), (True, False, True))),
    "lowest_frozen": ("alast", StepPlan((0.5, 1.0, 1.0), (False, True, True))),
    "recompute": ("alast", StepPlan((1.0, 0.5, 1.0), (True, True, True), (True, False, False))),
    "head": ("head", StepPlan((1.0,) * 3, (False,) * 3)),
}


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("batch", [2, 5])
def test_predicted_activations_match_counted(model, cal, name, batch):
    method, plan = PLANS[name]
    cost = cost_for(model, cal, method)
    shape = cost.shape(batch, plan.keep_ratios, plan.trainable, plan.recompute)
    counted, tokens = counted_step_bytes(model, plan, batch, method)
    assert list(shape.tokens) == tokens
    predicted = cost.step_activation_bytes(shape)
    assert predicted == pytest.approx(counted, rel=0.10), (name, predicted, counted)


def test_lora_costs_only_adapter_gradients_and_optimizer_state(cal):
    """A LoRA model's blocks train only their adapters: optimizer state and held gradients shrink accordingly."""
    from edge_alast.adapters.lora import LoraConfig, apply_lora

    plain = tiny_model()
    lora = tiny_model()
    apply_lora(lora, LoraConfig(r=2))
    kw = dict(img_size=32, baseline_bytes=0, eval_batch_size=4)
    full_cost = CostModel(plain, cal, trainable=trainable_for(plain, "alast"), **kw)
    lora_cost = CostModel(lora, cal, trainable=trainable_for(lora, "lora"), **kw)
    adapter_bytes = sum(p.numel() * 4 for n, p in lora.blocks.named_parameters() if "lora_" in n)
    assert sum(lora_cost.block_train_bytes) == adapter_bytes
    tail = full_cost.tail_bytes
    assert lora_cost.optimizer_bytes(0) == 2 * (adapter_bytes + tail)
    assert full_cost.optimizer_bytes(0) == 2 * (sum(full_cost.block_bytes) + tail)
    shape = full_cost.shape(4, (1.0,) * 3, (True,) * 3)
    assert lora_cost.peak(shape)["optimizer_step"] < full_cost.peak(shape)["optimizer_step"]
