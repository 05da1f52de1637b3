"""When a run ends before its last step: its validation curve has plateaued (``--stop-at-plateau``) or it has spent
its compute budget (``--max-tflops``).

Both rules are read inside the training loop, at the step they refer to, so where a run ends is a function of its
settings and its curve alone: the same run stops at the same step on every rerun. (A benchmark that watched the
curve from outside and signalled the process ended it one step late whenever the signal arrived during the next
step: ``tools/bench_tta.py`` measured a final model 1.2 points apart from one extra step.)

An ALaST run that anneals its keep ratios (``alast.anneal_last``) does not stop at its plateau: it would end on the
token-dropped view annealing exists to leave. The plateau brings its end forward instead (:func:`annealed_end`), and
it anneals from there, as a run of that length would over its last share of steps.

Plateau: the trailing mean over ``window`` evaluations has not gained ``min_gain`` over the best it reached before
the last ``patience`` evaluations (full windows only): a single noisy evaluation neither starts nor ends it.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..methods import METHODS

PLATEAU = "plateau"
BUDGET = "budget"


def curve_start(method: str, estimation_steps: int) -> int:
    """The validation points after this many steps count for the plateau: Light-PEFT's only after its pruning at
    ``estimation_steps`` (before it the unpruned model is evaluated, whose accuracy would start the plateau clock that
    then stops the run in the dip that follows the pruning); every point for the other methods."""
    return estimation_steps if METHODS[method].light_peft else 0


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: each point is the mean of it and the ``window`` - 1 before it (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def plateau_at(accuracies: Sequence[float], window: int, patience: int, min_gain: float) -> int | None:
    """The first evaluation at which the trailing average over ``window`` evaluations has not gained ``min_gain``
    over the best it reached before the last ``patience`` evaluations (full windows only), or None."""
    s = smooth(accuracies, window)
    for i in range(window - 1 + patience, len(s)):
        before = max(s[window - 1:i - patience + 1])
        if max(s[i - patience + 1:i + 1]) < before + min_gain:
            return i
    return None


def stop_reason(accuracies: Sequence[float], flops_total: float, *, at_plateau: bool, window: int, patience: int,
                min_gain: float, max_flops: float | None) -> str | None:
    """Why a run ends here: ``budget`` once ``flops_total`` reaches ``max_flops``, ``plateau`` once
    ``accuracies`` (the validation curve so far) has plateaued and ``at_plateau`` is set; else None."""
    if max_flops is not None and flops_total >= max_flops:
        return BUDGET
    if at_plateau and plateau_at(accuracies, window, patience, min_gain) is not None:
        return PLATEAU
    return None


def annealed_end(step: int, total_steps: int, anneal_last: float) -> int:
    """Where a run that anneals its last ``anneal_last`` share of steps ends when it plateaus after ``step`` steps:
    after annealing for that share of the run it becomes (``step / (1 - anneal_last)`` steps long), or at
    ``total_steps`` if that comes first."""
    return min(total_steps, step + math.ceil(step * anneal_last / (1.0 - anneal_last)))
