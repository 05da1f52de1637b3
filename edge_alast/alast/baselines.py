"""The ``static`` and ``random`` ALaST baselines, built from an ALaST run at matched cost.

Does adapting per step earn its keep? The baselines answer it in the same engine: the per-block keep ratios an
ALaST run used on average, held constant, with the same K blocks trained every step (``static``: the K blocks the
run trained most often) or K blocks drawn uniformly each step (``random``: what the reference update does in
practice, its softmax over budgets in [0.5, 1] being nearly uniform). A comparison is only fair at matched cost, so
when the mean keep ratios do not give FLOPs per step within ``TOLERANCE`` of the run's, they are scaled by one
factor until they do (found by bisection on the one FLOP model, :class:`edge_alast.model.flops.StepFlopCounter`; the
factor is recorded).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..config import AlastConfig
from ..errors import ConfigError
from ..runfolder import METRICS_FILE, SUMMARY_FILE, metric, read_json_if_any, read_metrics

TOLERANCE = 0.05
MAX_EXACT_COMBINATIONS = 2000  # beyond this many K-subsets, the random baseline's FLOPs are averaged over a sample
SAMPLES = 1000


SCHEDULE = "alast_schedule"  # summary.json's key for the schedule an ALaST run kept (:func:`schedule_of`)


def schedule_of(steps: Sequence[dict], depth: int | None = None, where: str = "the run") -> dict:
    """What the baselines take from an ALaST run, from its ``step`` lines: the per-block keep ratio as its steps
    used it (``plan/keep_ratio``) averaged over its steps, how many steps each block trained (``blocks/trainable``)
    and its mean FLOPs per step. ``summary.json`` keeps it (:data:`SCHEDULE`), so it outlives the step lines."""
    if not steps:
        raise ConfigError(f"{where} has no training steps")
    ratios = [metric(r, "plan/keep_ratio") for r in steps]
    depth = depth if depth is not None else len(ratios[0]) if isinstance(ratios[0], list) else 0
    if not depth or any(not isinstance(x, list) or len(x) != depth for x in ratios):
        raise ConfigError(f"{where} is not a run of a {depth or 'ViT'}-block model with per-block keep ratios")
    return {"steps": len(steps),
            "mean_keep_ratios": [sum(x[i] for x in ratios) / len(ratios) for i in range(depth)],
            "trainable_counts": [sum(i in r.get("blocks/trainable", ()) for r in steps) for i in range(depth)],
            "flops_per_step": sum(r.get("flops/step", 0) for r in steps) / len(steps)}


def read_schedule(run_dir: str | Path, depth: int | None = None, option: str = "--alast-from") -> dict:
    """An ALaST run's schedule (:func:`schedule_of`): from the step lines of its ``metrics.jsonl``, else from its
    ``summary.json`` (a folder that holds only the summary, such as the benchmark's ``--restore`` writes); its FLOPs
    per step are the summary's ``train_flops_per_step`` where it has one. ``option`` names what the user gave in
    errors."""
    run_dir = Path(run_dir)
    summary = read_json_if_any(run_dir / SUMMARY_FILE) or {}
    steps = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("event") == "step"]
    if steps:
        schedule = schedule_of(steps, depth, f"{option}: {run_dir}")
    else:
        schedule = dict(summary.get(SCHEDULE) or {})
        if not schedule:
            raise ConfigError(f"{option}: {run_dir} has no training steps in metrics.jsonl and no {SCHEDULE} in "
                              f"{SUMMARY_FILE}")
        depth = depth if depth is not None else len(schedule.get("mean_keep_ratios") or ())
        if not depth or any(len(schedule.get(k) or ()) != depth for k in ("mean_keep_ratios", "trainable_counts")):
            raise ConfigError(f"{option}: {run_dir}/{SUMMARY_FILE}: {SCHEDULE} is not that of a {depth or 'ViT'}-"
                              "block model (mean_keep_ratios and trainable_counts, one per block)")
    if isinstance(summary.get("train_flops_per_step"), (int, float)):
        schedule["flops_per_step"] = float(summary["train_flops_per_step"])
    return schedule


def mean_keep_ratios(run_dir: str | Path, depth: int | None = None, option: str = "--alast-from") -> list[float]:
    """An ALaST run's per-block keep ratio as its steps used it, averaged over its steps (:func:`read_schedule`)."""
    return read_schedule(run_dir, depth, option)["mean_keep_ratios"]


def read_alast_run(run_dir: str | Path, depth: int, k: int) -> tuple[list[float], list[int], float]:
    """An ALaST run's per-block mean keep ratio, its ``k`` most-trained blocks (ties: the higher mean keep ratio,
    then the lower index) and its mean FLOPs per step."""
    schedule = read_schedule(run_dir, depth)
    means, counts = schedule["mean_keep_ratios"], schedule["trainable_counts"]
    blocks = sorted(sorted(range(depth), key=lambda i: (-counts[i], -means[i], i))[:k])
    return means, blocks, float(schedule["flops_per_step"])


def expected_flops(update: str, keep_ratios: Sequence[float], blocks: Sequence[int], k: int,
                   flops_of: Callable[[Sequence[float], Sequence[bool]], int]) -> float:
    """FLOPs per step of a baseline: its one plan (static), or the mean over K-subsets drawn uniformly (random)."""
    depth = len(keep_ratios)
    if update == "static":
        return float(flops_of(keep_ratios, [i in blocks for i in range(depth)]))
    n = 1
    for j in range(k):
        n = n * (depth - j) // (j + 1)
    if n <= MAX_EXACT_COMBINATIONS:
        subsets = list(itertools.combinations(range(depth), k))
    else:
        rng = random.Random(0)
        subsets = [rng.sample(range(depth), k) for _ in range(SAMPLES)]
    return sum(flops_of(keep_ratios, [i in s for i in range(depth)]) for s in subsets) / len(subsets)


def baseline_config(config: AlastConfig, depth: int,
                    flops_of: Callable[[Sequence[float], Sequence[bool]], int]) -> tuple[AlastConfig, dict]:
    """``config`` (update ``static`` or ``random`` with ``from_run``) with ``keep_ratios`` and ``trainable_blocks``
    filled in from that run, at matched FLOPs; and what was matched, for the run's summary.

    ``flops_of(keep_ratios, trainable)``: FLOPs of one step of the model being trained with that plan.
    """
    k = config.k_trainable or -(-3 * depth // 4)
    means, blocks, target = read_alast_run(config.from_run, depth, k)
    scaled = lambda f: [min(1.0, r * f) for r in means]  # noqa: E731
    cost = lambda f: expected_flops(config.update, scaled(f), blocks, k, flops_of)  # noqa: E731
    factor = 1.0
    if abs(cost(1.0) - target) > TOLERANCE * target:
        lo, hi = 0.05, 1.0 / max(1e-6, min(means))
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
        factor = (lo + hi) / 2
    keep = scaled(factor)
    matched = {"from_run": str(config.from_run), "target_flops_per_step": target,
               "expected_flops_per_step": cost(factor), "keep_ratio_factor": factor,
               "mean_keep_ratios": means, "trainable_blocks": blocks}
    return replace(config, keep_ratios=keep, trainable_blocks=blocks if config.update == "static" else None), matched
