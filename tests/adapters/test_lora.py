"""LoRA adapters: wrapping is exact, merging is exact, only adapters train, ALaST freezes adapters per block."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edge_alast.errors import ConfigError
from edge_alast.model.flops import StepFlopCounter
from edge_alast.adapters.lora import LoRALinear, LoraConfig, apply_lora, lora_modules, merge_lora
from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan
from tests.helpers import tiny_model


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["vit", "vit_qknorm_reg", "deit_distilled"])
def test_fresh_adapters_leave_the_model_unchanged(kind):
    model = tiny_model(kind).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    wrapped = apply_lora(model, LoraConfig(r=4))
    assert len(wrapped) == 4 * len(model.blocks)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("targets", [["qkv", "proj", "fc1", "fc2"], ["qkv"], ["fc2", "proj"]])
def test_merged_model_equals_unmerged_and_is_timm_plain(targets):
    plain_keys = set(tiny_model().state_dict())
    model = tiny_model().eval()
    apply_lora(model, LoraConfig(r=3, alpha=6.0, targets=targets))
    _randomise_adapters(model)
    x = torch.randn(3, 3, 32, 32)
    unmerged = model(x)
    assert (unmerged - tiny_model().eval()(x)).abs().max() > 1e-3  # the adapters do change the output
    merge_lora(model)
    assert not lora_modules(model)
    assert set(model.state_dict()) == plain_keys
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_only_adapters_train_and_base_weights_stay_put():
    model = tiny_model().train()
    apply_lora(model, LoraConfig(r=2))
    trainable = {n for n, p in model.blocks.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    base = {n: p.detach().clone() for n, p in model.blocks.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    for n, p in model.blocks.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n])
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())


def test_bad_lora_settings_name_the_option():
    with pytest.raises(ConfigError, match="--lora-targets"):
        apply_lora(tiny_model(), LoraConfig(targets=["qkv", "head"]))
    with pytest.raises(ConfigError, match="--lora-r"):
        LoraConfig(r=0).validate()
    with pytest.raises(ConfigError, match="--lora-dropout"):
        LoraConfig(dropout=1.0).validate()


def test_alast_freezing_applies_to_each_blocks_adapters():
    model = tiny_model().train()
    apply_lora(model, LoraConfig(r=2))
    handle = apply_patch(model)
    handle.set_plan(StepPlan((1.0,) * 3, (False, True, False)))
    for i, block in enumerate(model.blocks):
        for n, p in block.named_parameters():
            assert p.requires_grad == (i == 1 and "lora_" in n), (i, n)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.blocks[0].parameters())
    assert model.blocks[1].attn.qkv.lora_A.grad is not None and model.blocks[1].attn.qkv.base.weight.grad is None
    handle.remove()
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.blocks.named_parameters())


@pytest.mark.parametrize("trainable,keep", [((True, True, True), 1.0), ((False, True, True), 0.5)])
def test_lora_step_flops_equal_counted_real_step(trainable, keep):
    """Frozen base weights get no weight gradients: the composed count follows what autograd runs."""
    model = tiny_model().train()
    apply_lora(model, LoraConfig(r=4))
    for name, p in model.named_parameters():
        if not name.startswith("blocks."):
            p.requires_grad_(name.startswith(("head", "norm")))
    full_counter = StepFlopCounter(tiny_model())
    counter = StepFlopCounter(model)
    handle = apply_patch(model)
    plan = StepPlan((keep,) * 3, trainable)
    handle.set_plan(plan)
    with FlopCounterMode(display=False) as real:
        model(torch.randn(3, 3, 32, 32)).sum().backward()
    composed = counter.step_flops(3, 32, handle.tokens_in, plan.trainable, keep_ratios=plan.keep_ratios)
    assert composed == real.get_total_flops()
    plain = full_counter.step_flops(3, 32, handle.tokens_in, plan.trainable, keep_ratios=plan.keep_ratios)
    assert composed < plain  # no base-weight gradients, which outweighs the adapters' few FLOPs at r=4


def test_lora_linear_knows_nothing_of_light_peft():
    """Light-PEFT measures importances with hooks of its own: a LoRALinear has no recording state and computes
    base + delta in every forward."""
    base = nn.Linear(8, 4)
    m = LoRALinear(base, r=2, alpha=2.0)
    assert not {"record", "last_importance"} & set(vars(m))
    with torch.no_grad():
        m.lora_B.fill_(0.1)
    x = torch.randn(5, 8)
    torch.testing.assert_close(m(x), base(x) + m.delta(x))
    assert not m._forward_hooks and not m._forward_pre_hooks