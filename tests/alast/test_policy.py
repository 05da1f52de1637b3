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


@pytest.mark.parametrize("field,value,named", [
    ("b_min", 0.0, "--alast-b-min"), ("b_init", 0.4, "--alast-b-init"), ("alpha", -1.0, "alast.alpha"),
    ("k_trainable", 13, "--alast-k-trainable"), ("sampling", "random", "alast.sampling"),
    ("temperature", 0.0, "alast.temperature"), ("anneal_last", 1.0, "--alast-anneal-last"),
    ("freeze", "no", "--alast-freeze")])
def test_invalid_config_names_field(field, value, named):
    """The error names the flag where the field has one, else the run-file key."""
    with pytest.raises(ValueError, match=named):
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


def test_fixed_keep_ratios_are_costed_at_their_caps_when_they_anneal():
    """A planner costs the worst step: annealing (``anneal_last``) raises static/random's fixed ratios to 1 (or the
    caps) by the last step, so that step is what must fit, not the ratios they start from."""
    keep = [0.9, 0.7, 0.8, 0.6]
    for update, extra in (("static", {"trainable_blocks": [1, 3]}), ("random", {})):
        plain = AlastPolicy(4, AlastConfig(update=update, keep_ratios=keep, k_trainable=2, **extra))
        assert {p.keep_ratios for p in plain.worst_plans()} == {tuple(keep)}
        annealing = AlastPolicy(4, AlastConfig(update=update, keep_ratios=keep, k_trainable=2, anneal_last=0.2,
                                               **extra))
        assert {p.keep_ratios for p in annealing.worst_plans()} == {(1.0,) * 4}
        caps = PolicyCaps(max_keep=(1.0, 0.8, 0.75, 0.7))
        assert {p.keep_ratios for p in annealing.worst_plans(caps)} == {caps.max_keep}


# ---------------------------------------------------------------------------------------------- co-authors' code
# Federico-Alvetreti/Split-Learning_ADC, methods/alast.py at 4b02f27 (Delta_Block): each block starts with
# budget 0.9 and delta 0; in every forward, delta = torch.norm(cls_out - cls_in, p=2).item() ** 2 over the whole
# batch (the batch *sum* of the per-image squared norms), budget = max(0.5, min(budget + (delta - previous) * alfa, 1))
# with alfa = the learning rate, then int(budget * N) patch tokens are kept, N = x.shape[1] counting the class token.

def test_coauthors_update_reproduces_their_arithmetic_by_hand():
    from edge_alast.alast.policy import LiveBudgets

    p = AlastPolicy(2, AlastConfig(update="coauthors"), lr=0.01)
    assert p.alpha == 0.01 and p.delta_reduction == "sum"  # their alfa = lr, on batch sums
    plan = p.decide()
    assert plan.count_prefix and isinstance(plan.live, LiveBudgets)
    # Step 0, batch of 2 images. Block 0: per-image squared CLS changes 1.0 and 2.0 -> batch sum 3.0.
    # Block 1: 15.0 and 25.0 -> 40.0. Their previous delta is 0, so the first step already moves the budgets:
    #   block 0: 0.9 + (3.0 - 0) * 0.01 = 0.93;  block 1: 0.9 + (40.0 - 0) * 0.01 = 1.3 -> clipped to 1.0
    # and the same forward keeps int(0.93 * 65) = int(60.45) = 60 of 64 patch tokens after block 0 (65 tokens in).
    assert plan.live.keep_ratio(0, 3.0) == pytest.approx(0.93)
    assert plan.live.keep_ratio(1, 40.0) == 1.0
    assert count_kept(64, 0.93, count_prefix=1) == 60
    assert count_kept(64, 0.93) == 59  # reference: floor(0.93 * 64) = floor(59.52)
    p.observe([3.0, 40.0])
    assert p.budgets == pytest.approx([0.93, 1.0])  # what the forward used
    # Step 1: block 0 sum 1.0 -> 0.93 + (1.0 - 3.0) * 0.01 = 0.91; block 1 sum 0.0 -> 1.0 + (0 - 40) * 0.01 = 0.6
    live = p.decide().live
    assert (live.keep_ratio(0, 1.0), live.keep_ratio(1, 0.0)) == pytest.approx((0.91, 0.6))
    p.observe([1.0, 0.0])
    assert p.budgets == pytest.approx([0.91, 0.6])
    # Step 2: block 1 sum 0.0 again -> 0.6 + (0 - 0) * 0.01 = 0.6 (the telescoped form b0 + alpha * delta^t)
    p.observe([1.0, 0.0])
    assert p.budgets == pytest.approx([0.91, 0.6])


def test_reference_differs_from_coauthors_on_the_first_step():
    ref = AlastPolicy(2, AlastConfig(update="reference", alpha=0.01))
    ref.observe([3.0, 40.0])  # reference: the first step only records delta^0
    assert ref.budgets == [0.9, 0.9] and ref.decide().live is None and not ref.decide().count_prefix


def test_coauthors_token_count_at_112px_keeps_more_than_reference():
    """At 112 px (64 patches + class token), every budget 0.9. Theirs, int(0.9 * N) with N all tokens:
    65 -> int(58.5) = 58 patches, then N = 59 -> 53, 54 -> 48, 49 -> 44, 45 -> 40, 41 -> 36, 37 -> 33, 34 -> 30,
    31 -> 27, 28 -> 25, 26 -> 23: block 11 sees 23 patches + the class token. Reference, floor(0.9 * patches):
    64 -> 57 -> 51 -> 45 -> 40 -> 36 -> 32 -> 28 -> 25 -> 22 -> 19 -> 17."""
    from edge_alast.alast.policy import tokens_per_block

    theirs = tokens_per_block(65, 1, [0.9] * 12, count_prefix=True)
    ours = tokens_per_block(65, 1, [0.9] * 12)
    assert theirs[:12] == [65, 59, 54, 49, 45, 41, 37, 34, 31, 28, 26, 24]
    assert ours[:12] == [65, 58, 52, 46, 41, 37, 33, 29, 26, 23, 20, 18]


def test_coauthors_state_resumes_with_its_zero_first_delta():
    p = AlastPolicy(3, AlastConfig(update="coauthors", seed=2), lr=0.01)
    assert p.prev_deltas == [0.0, 0.0, 0.0]
    p.observe([1.0, 2.0, 3.0])
    q = AlastPolicy(3, AlastConfig(update="coauthors", seed=2), lr=0.01)
    q.load_state_dict(p.state_dict())
    assert q.decide() == p.decide()


# ---------------------------------------------------------------------------------------------- ablations, remedy
def test_freezing_only_keeps_every_token():
    p = AlastPolicy(4, AlastConfig(b_init=1.0, b_min=1.0, seed=0), lr=1.0)
    for _ in range(3):
        plan = p.decide()
        assert plan.keep_ratios == (1.0,) * 4 and sum(plan.trainable) == 3
        p.observe([5.0, 0.1, 100.0, 3.0])  # Eq. 6 cannot move a budget clipped to [1, 1]


def test_no_freeze_trains_every_block_and_still_drops_tokens():
    p = AlastPolicy(4, AlastConfig(freeze=False, seed=0))
    assert p.k == 4 and p.trainable_count() == 4
    plan = p.decide()
    assert plan.trainable == (True,) * 4 and plan.keep_ratios == (0.9,) * 4
    assert p.trainable_count(PolicyCaps(lowest_trainable=1)) == 3  # caps still bound it


def test_anneal_progress_and_plan():
    from edge_alast.alast.policy import LiveBudgets, anneal_plan, anneal_progress

    # 10 steps, the last 20 % = steps 8 and 9 (0-based): 0 before, 0.5, then 1 at the last step
    assert [anneal_progress(s, 10, 0.2) for s in range(10)] == [0.0] * 8 + [0.5, 1.0]
    assert anneal_progress(9, 10, 0.0) == 0.0
    plan = StepPlan(keep_ratios=(0.6, 1.0), trainable=(True, False))
    assert anneal_plan(plan, 0.0) is plan
    assert anneal_plan(plan, 0.5).keep_ratios == pytest.approx((0.8, 1.0))
    assert anneal_plan(plan, 1.0).keep_ratios == (1.0, 1.0)  # exactly: every token
    assert anneal_plan(plan, 0.5).trainable == plan.trainable  # freezing is not annealed
    # under a planner's cap the ratios rise to the cap, never past it
    assert anneal_plan(plan, 1.0, PolicyCaps(max_keep=(0.7, 0.7))).keep_ratios == (0.7, 1.0)
    live = StepPlan((0.9, 0.9), (True, True), live=LiveBudgets((0.9, 0.9), (0.0, 0.0), 0.1, 0.5))
    assert anneal_plan(live, 1.0).live.keep_ratio(0, 0.0) == 1.0  # live budgets anneal too
    assert anneal_plan(live, 0.5).live.keep_ratio(0, -2.0) == pytest.approx(0.5 * 0.7 + 0.5)
