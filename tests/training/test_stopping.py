"""The stop rules train applies at an evaluation (edge_alast.training.stopping), on synthetic curves."""
from __future__ import annotations

import pytest

from edge_alast.training.stopping import BUDGET, PLATEAU, annealed_end, curve_start, plateau_at, smooth, stop_reason


def test_smoothing_is_a_trailing_mean():
    assert smooth([0.0, 3.0, 6.0, 3.0], 3) == pytest.approx([0.0, 1.5, 3.0, 4.0])
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    assert smooth([], 3) == []


def test_plateau_on_the_smoothed_curve_not_on_single_evaluations():
    # A rising curve, then flat at 0.80 with +-0.02 noise. Window 3, patience 2, min gain 0.005.
    # trailing means: 0.5, 0.6, 0.7, 0.8, 0.8067, 0.7933, 0.8067, 0.7933
    accs = [0.5, 0.7, 0.9, 0.8, 0.82, 0.78, 0.82, 0.78]
    # at i = 6 the last two means (0.7933, 0.8067) have not beaten the best before them (0.8067) by 0.005
    assert plateau_at(accs, window=3, patience=2, min_gain=0.005) == 6
    assert plateau_at(accs[:6], window=3, patience=2, min_gain=0.005) is None
    steady = [0.1 * i for i in range(10)]  # always gaining: never a plateau
    assert plateau_at(steady, window=3, patience=4, min_gain=0.005) is None
    # one bad evaluation does not end a rising run when patience outlasts the window it spoils (4 > 3)
    dip = [0.5, 0.6, 0.7, 0.2, 0.8, 0.85, 0.9, 0.92, 0.95]
    assert plateau_at(dip, window=3, patience=4, min_gain=0.005) is None
    assert plateau_at(dip, window=3, patience=2, min_gain=0.005) == 4  # a shorter patience is fooled by it


def test_the_budget_comes_before_the_plateau_and_each_rule_can_be_off():
    flat = [0.8, 0.8, 0.8, 0.8, 0.8]
    rule = dict(window=1, patience=2, min_gain=0.005)
    assert stop_reason(flat, 5e12, at_plateau=True, max_flops=4e12, **rule) == BUDGET
    assert stop_reason(flat, 3e12, at_plateau=True, max_flops=4e12, **rule) == PLATEAU
    assert stop_reason(flat, 3e12, at_plateau=False, max_flops=4e12, **rule) is None
    assert stop_reason(flat, 9e99, at_plateau=False, max_flops=None, **rule) is None
    assert stop_reason([], 4e12, at_plateau=True, max_flops=4e12, **rule) == BUDGET  # reached exactly
    assert stop_reason([0.5, 0.6, 0.7], 0.0, at_plateau=True, max_flops=None, **rule) is None  # still rising


def test_a_plateau_brings_an_annealing_runs_end_forward_by_its_annealing_share():
    # plateau after 400 steps, anneal the last 20 %: 100 more steps make the annealing 20 % of a 500-step run
    assert annealed_end(400, 3000, 0.2) == 500
    assert annealed_end(4, 20, 0.5) == 8
    assert annealed_end(2900, 3000, 0.2) == 3000  # never past the run's own end
    from edge_alast.alast.policy import anneal_progress
    end = annealed_end(400, 3000, 0.2)  # the annealing starts with the first step after the plateau (0-based 400)
    assert anneal_progress(399, end, 0.2) == 0.0 and anneal_progress(400, end, 0.2) > 0.0
    assert anneal_progress(end - 1, end, 0.2) == 1.0


def test_light_peft_curves_count_from_its_pruning_and_every_other_methods_from_the_start():
    assert curve_start("light-peft", 40) == 40
    assert curve_start("light-peft+alast", 25) == 25
    for method in ("full", "head", "alast", "lora", "alast-lora"):
        assert curve_start(method, 40) == 0
