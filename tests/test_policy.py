"""The ALaST policy alone: pure, deterministic, serialisable; budgets follow the paper's Eq. 6."""
import math

import pytest

from edge_alast.policy import AlastConfig, AlastPolicy, PolicyCaps, StaticPolicy, StepPlan, count_kept, default_alpha


def test_budget_update_matches_hand_computation():
    p = AlastPolicy(3, AlastConfig(b_init=0.9, b_min=0.5, alpha=0.1))
    p.observe([1.0, 2.0, 3.0])  # first step only records delta^0
    assert p.budgets == [0.9, 0.9, 0.9]
    p.observe([1.5, 1.0, 3.2])
    # b + alpha * (d_t - d_{t-1}): 0.9+0.05, 0.9-0.1, 0.9+0.02
    assert p.budgets == pytest.approx([0.95, 0.8, 0.92])
    p.observe([3.0, -10.0, 3.2])  # clipped to [b_min, 1]
    assert p.budgets == pytest.approx([1.0, 0.5, 0.92])


def test_default_alpha_is_lr_times_reference_batch():
    p = AlastPolicy(4, lr=3e-5)
    assert p.alpha == pytest.approx(3e-5 * 16) == default_alpha(3e-5)
    assert p.k == 3  # ceil(3/4 * 4)
    assert AlastPolicy(12).k == 9


def test_decide_keeps_budgets_and_k_blocks():
    p = AlastPolicy(8, AlastConfig(k_trainable=5, seed=1))
    plan = p.decide()
    assert plan.keep_ratios == (0.9,) * 8
    assert sum(plan.trainable) == 5


def test_sampling_is_deterministic_given_seed_and_resumes_exactly():
    a, b = AlastPolicy(12, AlastConfig(seed=7)), AlastPolicy(12, AlastConfig(seed=7))
    deltas = [[float(i * j % 5) for i in range(12)] for j in range(6)]
    plans_a = []
    for d in deltas[:3]:
        plans_a.append(a.decide())
        a.observe(d)
    state = a.state_dict()
    for d in deltas[3:]:
        plans_a.append(a.decide())
        a.observe(d)
    for d in deltas[:3]:
        b.decide()
        b.observe(d)
    c = AlastPolicy(12, AlastConfig(seed=123))  # another seed, then the checkpoint restores everything
    c.load_state_dict(state)
    resumed = []
    for d in deltas[3:]:
        resumed.append(c.decide())
        c.observe(d)
    assert resumed == plans_a[3:]
    assert c.budgets == a.budgets


def test_different_seeds_sample_differently():
    a = [AlastPolicy(12, AlastConfig(seed=0)).decide().trainable for _ in range(1)]
    draws = {AlastPolicy(12, AlastConfig(seed=s)).decide().trainable for s in range(10)}
    assert len(draws) > 1 and a[0] in draws


def test_topk_sampling_takes_highest_budgets():
    p = AlastPolicy(4, AlastConfig(k_trainable=2, sampling="topk", alpha=1.0, b_min=0.1))
    p.observe([0, 0, 0, 0])
    p.observe([-0.3, 0.05, -0.5, 0.1])
    assert p.decide().trainable == (False, True, False, True)


def test_softmax_sampling_prefers_higher_budgets():
    p = AlastPolicy(4, AlastConfig(k_trainable=1, alpha=1.0, b_min=0.01, temperature=0.05, seed=3))
    p.budgets = [0.1, 0.1, 0.1, 1.0]
    picks = [p.decide().trainable.index(True) for _ in range(50)]
    assert picks.count(3) > 45


def test_caps_bound_keep_k_and_lowest_block():
    p = AlastPolicy(6, AlastConfig(k_trainable=5))
    caps = PolicyCaps(max_keep=(0.5,) * 6, max_trainable=2, lowest_trainable=3, recompute=(True,) + (False,) * 5)
    for _ in range(20):
        plan = p.decide(caps)
        assert plan.keep_ratios == (0.5,) * 6
        assert sum(plan.trainable) == 2 and not any(plan.trainable[:3])
        assert plan.recompute[0]
    assert p.budgets == [0.9] * 6  # caps never change the budgets


def test_count_kept():
    assert count_kept(256, 0.9) == 230
    assert count_kept(256, 1.0) == 256
    assert count_kept(3, 0.1) == 1
    assert count_kept(256, 0.9, multiple=8) == 224
    assert count_kept(230, 0.9, multiple=8) == 200
    assert count_kept(5, 0.5, multiple=8) == 2


@pytest.mark.parametrize("field,value", [("b_min", 0.0), ("b_init", 0.4), ("alpha", -1.0), ("k_trainable", 13),
                                          ("sampling", "random"), ("temperature", 0.0)])
def test_invalid_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        AlastPolicy(12, AlastConfig(**{field: value}))


def test_static_policies():
    assert StaticPolicy(3, True).decide() == StepPlan((1.0,) * 3, (True,) * 3)
    assert StaticPolicy(3, False).decide().lowest_trainable is None


def test_plan_validation():
    with pytest.raises(ValueError):
        StepPlan((1.0, 0.0), (True, True))
    with pytest.raises(ValueError):
        StepPlan((1.0,), (True, False))
    assert math.isclose(StepPlan((0.5,), (True,)).keep_ratios[0], 0.5)
