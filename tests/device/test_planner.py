"""The planner: the worst step under the memory and FLOP ceilings, caps in order, impossible plans named with numbers,
adapters, the export's own figure."""
from __future__ import annotations

import pytest

from edge_alast.alast.policy import AlastConfig, AlastPolicy, make_policy
from edge_alast.device.calibration import calibrate
from edge_alast.device.planner import plan_run
from edge_alast.device.profiles import parse_profile
from edge_alast.errors import ConfigError
from edge_alast.methods import METHODS
from tests.helpers import PLAN_BASELINE as BASELINE
from tests.helpers import TINY, cost_for, tiny_model, trainable_for

IMG = TINY["img_size"]
K2 = AlastConfig(b_init=1.0, k_trainable=2)


def plan_tiny(model, cal, profile=None, method="alast", alast_config=None, **kw):
    spec = METHODS[method]
    kw = {"img_size": IMG, "calibration": cal, "baseline_bytes": BASELINE, "eval_batch_size": 1, **kw}
    return plan_run(model, profile, policy=make_policy(spec, spec.stages[0], len(model.blocks), alast_config),
                    kind=spec.plan_kind, trainable=trainable_for(model, method), **kw)


@pytest.mark.parametrize("fraction", [1.5, 1.0, 0.97, 0.9, 0.8, 0.7, 0.6])
def test_plan_keeps_worst_step_under_ceilings(model, cal, fraction):
    free = plan_tiny(model, cal, None, batch_size=16, method="alast", alast_config=K2)
    ceiling = BASELINE + int(fraction * (free.predicted_peak_bytes - BASELINE))
    flop_ceiling = fraction * free.predicted_flops_per_step
    try:
        plan = plan_tiny(model, cal, None, batch_size=16, method="alast", alast_config=K2,
                         memory_ceiling_bytes=ceiling, flop_ceiling_per_step=flop_ceiling)
    except ConfigError:
        pytest.skip("nothing fits this ceiling (covered by test_impossible_ceiling)")
    assert plan.predicted_peak_bytes <= ceiling
    assert plan.predicted_flops_per_step <= flop_ceiling
    assert plan.memory_ceiling_bytes == ceiling
    if fraction >= 1.0:
        assert plan.notes == ["fits without caps"] and plan.batch_size == 16
    # The prediction is the worst case: no step the capped policy actually draws costs more.
    cost = cost_for(model, cal, eval_batch_size=1)
    policy = AlastPolicy(3, K2)
    for _ in range(20):
        step = policy.decide(plan.caps)
        shape = cost.shape(plan.batch_size, step.keep_ratios, step.trainable, step.recompute)
        assert cost.peak(shape, plan.caps.lowest_trainable)["peak"] <= plan.predicted_peak_bytes + 1
        assert cost.flops(shape) <= plan.predicted_flops_per_step


def test_tight_ceiling_caps_in_order(model, cal):
    free = plan_tiny(model, cal, None, batch_size=16, method="alast")
    plan = plan_tiny(model, cal, None, batch_size=16, method="alast",
                     memory_ceiling_bytes=free.predicted_peak_bytes - 1)
    assert plan.caps.recompute[0] and plan.batch_size == 16  # recomputation is tried first
    assert any("recompute" in n for n in plan.notes)


def test_profile_ceilings_are_used(model, cal):
    profile = parse_profile({"name": "t", "description": "test", "device": "cpu", "memory_ceiling_bytes": "1GiB",
                             "flops_per_second": {"fp32": 1e9}, "target_step_seconds": 10,
                             "default_batch_size": 4, "default_precision": "fp32"}, "test")
    plan = plan_tiny(model, cal, profile, batch_size=4, method="alast")
    assert plan.memory_ceiling_bytes == 2**30 and plan.flop_ceiling_per_step == 1e10


def test_impossible_ceiling_raises_with_numbers(model, cal):
    ceiling = BASELINE // 2
    with pytest.raises(ConfigError) as e:
        plan_tiny(model, cal, None, batch_size=4, method="alast", memory_ceiling_bytes=ceiling)
    msg = str(e.value)
    assert f"{ceiling} bytes" in msg and "needs" in msg and "would fit" in msg
    needed = int(msg.split("needs ")[1].split(" bytes")[0])
    assert needed > ceiling


def test_impossible_weights_suggest_smaller_model(model, cal):
    cost = cost_for(model, cal)
    ceiling = BASELINE + cost.weight_bytes // 2
    with pytest.raises(ConfigError, match=r"at most [0-9.]+ M parameters"):
        plan_tiny(model, cal, None, batch_size=4, method="full", memory_ceiling_bytes=ceiling)


@pytest.mark.parametrize("fraction", [1.0, 0.95, 0.9, 0.85])
def test_full_never_drops_tokens(model, cal, fraction):
    free = plan_tiny(model, cal, None, batch_size=16, method="full")
    ceiling = BASELINE + int(fraction * (free.predicted_peak_bytes - BASELINE))
    try:
        plan = plan_tiny(model, cal, None, batch_size=16, method="full", memory_ceiling_bytes=ceiling)
    except ConfigError:
        return
    assert plan.caps.max_keep is None and plan.caps.max_trainable is None and plan.caps.lowest_trainable == 0
    assert plan.predicted_peak_bytes <= ceiling


def test_lora_and_light_peft_models_plan_under_a_tight_ceiling():
    """Planning a model with adapters (and Light-PEFT masks): calibration runs on the block as built, the adapter
    slack applies, and a ceiling below the free plan is met by recomputation as for full tuning."""
    from edge_alast.adapters.lightpeft import add_masks
    from edge_alast.adapters.lora import LoraConfig, apply_lora
    from edge_alast.device.costmodel import allocator_slack

    model = tiny_model()
    apply_lora(model, LoraConfig(r=2))
    add_masks(model)
    cal = calibrate(model, img_size=IMG, trainable=trainable_for(model, "light-peft"))
    assert cost_for(model, cal, method="light-peft").allocator_slack == allocator_slack(adapters=True)
    free = plan_tiny(model, cal, None, batch_size=16, method="light-peft")
    plan = plan_tiny(model, cal, None, batch_size=16, method="light-peft",
                     memory_ceiling_bytes=free.predicted_peak_bytes - 1)
    assert plan.predicted_peak_bytes < free.predicted_peak_bytes and plan.caps.recompute[0]
    # calibration left the flags as they were: adapters and masks train, base weights do not
    assert all(p.requires_grad == ("lora_" in n or n.endswith(".mask")) for n, p in model.blocks.named_parameters())


def test_an_export_that_cannot_fit_is_named_with_its_own_figure(model, cal, monkeypatch):
    import edge_alast.device.costmodel as costmodel

    # On the tiny model the export's copies of the weights do not set the peak (they do for models whose weights
    # outweigh their activations): weigh them more so that they do.
    monkeypatch.setattr(costmodel, "EXPORT_WEIGHT_COPIES", 40.0)
    free = plan_tiny(model, cal, None, batch_size=4, method="alast", export=True)
    export = free.breakdown["export"]
    ceiling = int(max(free.breakdown["train_peak"], free.breakdown["eval"], free.breakdown["save"]) + 1)
    assert export > ceiling  # the export is planned, and here it sets the peak
    with pytest.raises(ConfigError, match="--no-export .the ONNX export alone needs") as e:
        plan_tiny(model, cal, None, batch_size=4, method="alast", export=True, memory_ceiling_bytes=ceiling)
    assert "M parameters" not in str(e.value)  # training itself fits: no model-size hint
    plan = plan_tiny(model, cal, None, batch_size=4, method="alast", memory_ceiling_bytes=ceiling)
    assert plan.predicted_peak_bytes <= ceiling  # without the export it fits
