"""The ALaST policy alone: pure, deterministic, serialisable; budgets follow the paper's Eq. 6."""
import math

import pytest

from edge_alast.alast.policy import AlastConfig, AlastPolicy, PolicyCaps, StaticPolicy, StepPlan, count_kept, default_alpha


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


# -- the relative update and the baselines --------------------------------------------------------------------
REL = AlastConfig(update="relative", seed=3)


def drive(config, deltas_fn, streams_fn, steps=30, depth=6):
    policy = AlastPolicy(depth, config)
    trajectory = []
    for t in range(steps):
        policy.observe(deltas_fn(t), streams_fn(t))
        trajectory.append(list(policy.budgets))
    return policy, trajectory


def _deltas(t):
    return [1.0 + 0.1 * t, 0.2, 5.0, 0.05 * (1 + t % 3), 2.0, 80.0]


def _streams(t):
    return [0.5, 1.5, 4.0, 4.0, 15.0, 300.0]


def test_relative_update_is_scale_free_per_block():
    """A block whose residual stream is 1000x larger (its class-token change and norm both 1000x) keeps exactly
    the budget trajectory; so does scaling every block's measurements together."""
    _, reference = drive(REL, _deltas, _streams)
    def scaled(f):
        return lambda t: [v * (1000.0 if i == 2 else 1.0) for i, v in enumerate(f(t))]

    _, one_block = drive(REL, scaled(_deltas), scaled(_streams))
    assert sum(one_block, []) == pytest.approx(sum(reference, []), rel=1e-9, abs=1e-12)
    _, everything = drive(REL, lambda t: [7.0 * v for v in _deltas(t)], lambda t: [7.0 * v for v in _streams(t)])
    assert sum(everything, []) == pytest.approx(sum(reference, []), rel=1e-9, abs=1e-12)


def test_relative_budgets_follow_importance_and_average_b_init():
    policy, trajectory = drive(REL, _deltas, _streams)
    b = policy.budgets
    rho = [d / s for d, s in zip(_deltas(29), _streams(29))]
    assert sum(b) / len(b) == pytest.approx(REL.b_init, abs=1e-6)
    assert all(REL.b_min <= v <= 1.0 for v in b)
    assert max(b) - min(b) > 0.2  # budgets differ where blocks differ (the mean is pinned at b_init = 0.9)
    assert b.index(max(b)) == rho.index(max(rho)) and b.index(min(b)) == rho.index(min(rho))


def test_relative_sampling_prefers_important_blocks():
    policy, _ = drive(REL, _deltas, _streams)
    counts = [0] * 6
    for _ in range(400):
        for i, t in enumerate(policy.decide().trainable):
            counts[i] += t
    order = sorted(range(6), key=lambda i: policy.budgets[i])
    assert counts[order[-1]] > 1.5 * counts[order[0]]


def test_relative_state_resumes_exactly():
    a, _ = drive(REL, _deltas, _streams, steps=10)
    b = AlastPolicy(6, REL)
    b.load_state_dict(a.state_dict())
    for t in range(10, 20):
        a.observe(_deltas(t), _streams(t))
        b.observe(_deltas(t), _streams(t))
        assert a.decide() == b.decide()


def test_relative_budgets_edge_cases():
    from edge_alast.alast.policy import relative_budgets

    assert relative_budgets([1.0, 2.0], 1.0, 0.5, 1.5) == [1.0, 1.0]
    assert relative_budgets([1.0, 2.0], 0.5, 0.5, 1.5) == [0.5, 0.5]
    assert relative_budgets([3.0, 3.0, 3.0], 0.8, 0.5, 1.5) == pytest.approx([0.8] * 3)


def test_reference_update_needs_no_stream_and_relative_does():
    AlastPolicy(3, AlastConfig()).observe([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="class token's squared norm"):
        AlastPolicy(3, REL).observe([1.0, 2.0, 3.0])


def test_static_and_random_baselines_keep_their_ratios():
    keep = [0.9, 0.7, 0.8, 0.6]
    static = AlastPolicy(4, AlastConfig(update="static", keep_ratios=keep, trainable_blocks=[1, 3], k_trainable=2))
    random_ = AlastPolicy(4, AlastConfig(update="random", keep_ratios=keep, k_trainable=2))
    seen = set()
    for _ in range(50):
        static.observe([1.0] * 4, [1.0] * 4)
        assert static.decide() == StepPlan(tuple(keep), (False, True, False, True))
        plan = random_.decide()
        assert plan.keep_ratios == tuple(keep) and sum(plan.trainable) == 2
        seen.add(plan.trainable)
    assert len(seen) == 6  # every pair of 4 blocks is drawn
    with pytest.raises(ValueError, match="keep_ratios"):
        AlastPolicy(4, AlastConfig(update="random"))
