"""Ceiling-aware planning: the caps that keep the most expensive step a policy can take under a device profile's
memory and FLOP ceilings.

The search costs each candidate with the cost model (:mod:`edge_alast.device.costmodel`) on the policy's own worst plans
(``policy.worst_plans(caps)``), so what a policy can do is defined once, in the policy. Tightening follows one order,
cheapest accuracy cost first, here and in the runtime guard (:func:`tighten`, :mod:`edge_alast.device.guard`):

1. recompute the activations of eligible blocks, lowest (most tokens) first -- costs time, not accuracy;
2. raise the lowest trainable block (K shrinks only when fewer blocks than K remain) -- low blocks hold generic
   features and the most tokens;
3. cap every block's keep ratio (``KEEP_LEVELS``) -- fewer tokens per step;
4. a smaller batch, down to 1 (planner only) -- changes the optimisation itself, so last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from torch import nn

from .calibration import Calibration, calibrate
from .costmodel import OPTIMIZER_STATES, CostModel
from ..errors import ConfigError
from ..model.flops import StepFlopCounter
from .memory import rss_bytes
from ..alast.policy import AlastPolicy, PolicyCaps, StaticPolicy
from ..model.trainable import TrainableSet

__all__ = ["KEEP_LEVELS", "RunPlan", "plan_run", "tighten"]

KEEP_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # max_keep caps, loosest first


@dataclass(frozen=True)
class RunPlan:
    """What the planner decided for a run.

    Attributes:
        caps: Caps to pass to ``policy.decide`` every step (recompute flags also apply to ``full``).
        batch_size: Images per step (the requested one unless it had to shrink).
        predicted_peak_bytes: Peak memory of the whole process: the most expensive step the capped policy can
            produce, evaluation, saving and (planned with ``export``) the ONNX export.
        predicted_train_peak_bytes: The training steps' own peak.
        memory_ceiling_bytes: The profile's ceiling (None without a profile).
        flop_ceiling_per_step: The profile's FLOP budget per step at the run's precision (None: no budget).
        predicted_flops_per_step: FLOPs of the most expensive step (recomputed forwards included).
        notes: What was capped and why, in words.
        breakdown: The predicted peak's parts (bytes), for the summary.
        cost: The cost model the plan was made with (for predictions of other steps).
    """

    caps: PolicyCaps
    batch_size: int
    predicted_peak_bytes: int
    memory_ceiling_bytes: int | None
    flop_ceiling_per_step: float | None
    predicted_flops_per_step: int
    notes: list[str] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict, compare=False)
    cost: CostModel | None = field(default=None, compare=False, repr=False)

    @property
    def predicted_train_peak_bytes(self) -> int:
        return math.ceil(self.breakdown.get("train_peak", self.predicted_peak_bytes))


# ================================================================================================================
# The tightening order
# ================================================================================================================


def _recompute_from(caps: PolicyCaps, train_below: bool) -> int:
    """The lowest block whose recomputation can save memory: where blocks start to store activations in the worst
    step (:func:`edge_alast.model.flops.stores_activations`): the lowest trainable block, or block 0 when the
    embeddings train."""
    return 0 if train_below else caps.lowest_trainable


def tighten(caps: PolicyCaps, depth: int, kind: str, train_below: bool = False) -> tuple[PolicyCaps, str] | None:
    """``caps`` one notch tighter in the module's order, and what changed in words; None when nothing is left.

    ``kind`` is the method's plan kind: ``full`` can only recompute, ``head`` has nothing to tighten.
    ``train_below``: the embeddings train (every block then stores activations).
    """
    if kind == "head":
        return None
    flags = list(caps.recompute or (False,) * depth)
    todo = [i for i in range(_recompute_from(caps, train_below), depth) if not flags[i]]
    if todo:
        flags[todo[0]] = True
        return replace(caps, recompute=tuple(flags)), f"recompute block {todo[0]}"
    if kind != "alast":
        return None
    if caps.lowest_trainable < depth - 1:
        top = caps.lowest_trainable + 1
        return replace(caps, lowest_trainable=top), f"lowest trainable block {caps.lowest_trainable} -> {top}"
    current = min(caps.max_keep) if caps.max_keep is not None else 1.0
    lower = [k for k in KEEP_LEVELS if k < current]
    if lower:
        return replace(caps, max_keep=(lower[0],) * depth), f"keep ratio cap {current:g} -> {lower[0]:g}"
    return None


def _candidates(depth: int, kind: str, base: PolicyCaps, train_below: bool) -> Iterator[PolicyCaps]:
    """Caps from the loosest to the tightest in the module's order (each level restarts the ones before it, so the
    first that fits is the cheapest in accuracy): recomputation within lowest trainable block within keep cap."""
    keep_levels, lows = (KEEP_LEVELS, range(base.lowest_trainable, depth)) if kind == "alast" else \
        ((1.0,), (base.lowest_trainable,))
    base_recompute = tuple(base.recompute or (False,) * depth)
    for keep in keep_levels:
        for lo in lows:
            caps = PolicyCaps(max_keep=None if keep >= 1.0 else (keep,) * depth, lowest_trainable=lo,
                              recompute=base_recompute)
            eligible = [] if kind == "head" else [
                i for i in range(_recompute_from(caps, train_below), depth) if not base_recompute[i]]
            for r in range(len(eligible) + 1):
                yield replace(caps, recompute=tuple(base_recompute[i] or i in eligible[:r] for i in range(depth)))


# ================================================================================================================
# Planner
# ================================================================================================================


def _mib(n: float) -> str:
    return f"{int(n)} bytes ({n / 2**20:.1f} MiB)"


def plan_run(model: nn.Module, profile=None, *, policy: AlastPolicy | StaticPolicy, kind: str,
             trainable: TrainableSet, img_size: int, batch_size: int, precision: str = "fp32", device: str = "cpu",
             lowest_trainable: int = 0, recompute: Sequence[bool] | None = None, eval_batch_size: int = 64,
             token_multiple: int = 1, flop_counter: StepFlopCounter | None = None, baseline_bytes: int | None = None,
             calibration: Calibration | None = None, memory_ceiling_bytes: int | None = None,
             flop_ceiling_per_step: float | None = None, export: bool = False) -> RunPlan:
    """Caps that keep the most expensive step ``policy`` can take under the profile's memory and FLOP ceilings.

    Call after the model is built and its weights loaded, before optimizer state exists: the process baseline is
    the RSS now less the weights. The first candidate in the module's order that fits wins, at the largest batch
    that has one. ``kind`` is the method's plan kind (``alast``, ``full``, ``head``); ``trainable`` what can ever
    train; ``lowest_trainable`` and ``recompute`` the run's own settings (the planner only tightens them).

    Raises:
        ConfigError: Nothing fits; the message gives needed and available bytes (or FLOPs) and what would fit.
    """
    depth = len(model.blocks)
    mem_ceiling = memory_ceiling_bytes if memory_ceiling_bytes is not None else (
        profile.memory_ceiling_bytes if profile is not None else None)
    flop_ceiling = flop_ceiling_per_step if flop_ceiling_per_step is not None else (
        profile.flop_ceiling(precision) if profile is not None else None)
    if baseline_bytes is None:
        on_host = all(p.device.type == "cpu" for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) if on_host else 0
        baseline_bytes = max(0, rss_bytes() - weights)
    cal = calibration or calibrate(model, img_size=img_size, precision=precision, device=device, trainable=trainable)
    cost = CostModel(model, cal, img_size=img_size, trainable=trainable, baseline_bytes=baseline_bytes,
                     eval_batch_size=eval_batch_size, token_multiple=token_multiple, flop_counter=flop_counter,
                     export=export)
    base = PolicyCaps(lowest_trainable=min(max(0, lowest_trainable), depth - 1),
                      recompute=tuple(bool(r) for r in recompute) if recompute else (False,) * depth)

    last = None
    for batch in range(batch_size, 0, -1):
        for caps in _candidates(depth, kind, base, trainable.embeddings):
            plans = policy.worst_plans(caps)
            breakdown = cost.worst_peak(plans, batch)
            last = (batch, caps, breakdown)
            if mem_ceiling is not None and math.ceil(breakdown["peak"]) > mem_ceiling:
                continue
            flops = cost.worst_flops(plans, batch)
            if flop_ceiling is not None and flops > flop_ceiling:
                continue
            return RunPlan(caps=caps, batch_size=batch, predicted_peak_bytes=math.ceil(breakdown["peak"]),
                           memory_ceiling_bytes=mem_ceiling, flop_ceiling_per_step=flop_ceiling,
                           predicted_flops_per_step=int(flops), notes=_plan_notes(policy, base, batch_size, batch, caps),
                           breakdown=breakdown, cost=cost)
    raise _nothing_fits(cost, policy, model, last, mem_ceiling, flop_ceiling, img_size)


def _plan_notes(policy, base: PolicyCaps, asked_batch: int, batch: int, caps: PolicyCaps) -> list[str]:
    notes = []
    added = [i for i, (r, b) in enumerate(zip(caps.recompute, base.recompute)) if r and not b]
    if added:
        notes.append(f"recompute blocks {', '.join(map(str, added))} in backward (activations not stored)")
    if caps.lowest_trainable > base.lowest_trainable:
        notes.append(f"lowest trainable block raised {base.lowest_trainable} -> {caps.lowest_trainable}")
    k0, k = policy.trainable_count(base), policy.trainable_count(caps)
    if k < k0:
        notes.append(f"trainable blocks per step K {k0} -> {k}")
    if caps.max_keep is not None:
        notes.append(f"keep ratio capped at {max(caps.max_keep):g} in every block")
    if batch < asked_batch:
        notes.append(f"batch size {asked_batch} -> {batch}")
    return notes or ["fits without caps"]


def _nothing_fits(cost: CostModel, policy, model: nn.Module, last, mem_ceiling, flop_ceiling,
                  img_size: int) -> ConfigError:
    """The error for a run no caps can fit, with the numbers and what would fit (computed)."""
    batch, caps, breakdown = last  # the tightest setting the search tried (batch 1, everything capped)
    need = breakdown["peak"]
    if mem_ceiling is not None and need > mem_ceiling:
        dynamic = need - breakdown["static"]
        trained = (breakdown["optimizer"] / OPTIMIZER_STATES) if OPTIMIZER_STATES else 0.0
        fixed = breakdown["baseline"] + dynamic
        # bytes per parameter: weights, plus grads and optimizer state for those that train (fp32: 4 + 4 + 8)
        per_param = 4 + (4 + 4 * OPTIMIZER_STATES) * trained / max(1, cost.weight_bytes)
        params_fit = max(0.0, (mem_ceiling - fixed) / per_param)
        hints = []
        training_need = max(breakdown["train_peak"], breakdown["eval"], breakdown["save"])  # all but the export
        if breakdown["export"] > mem_ceiling:
            hints.append(f"--no-export (the ONNX export alone needs {_mib(breakdown['export'])}; export later on a "
                         "larger machine with `edge-alast export`)")
        if training_need <= mem_ceiling:
            pass  # only the export does not fit
        elif breakdown["baseline"] >= mem_ceiling:
            hints.append(f"the process alone (interpreter and libraries) takes {_mib(breakdown['baseline'])}")
        else:
            hints.append(f"a model of at most {params_fit / 1e6:.1f} M parameters "
                         f"(this one has {cost.weight_bytes / 4e6:.1f} M)")
            patch = cost.flop_counter.patch_size[0]
            for size in range(img_size - patch, patch - 1, -patch):
                if cost.resized(size).worst_peak(policy.worst_plans(caps), 1)["peak"] <= mem_ceiling:
                    hints.append(f"--img-size {size} at batch 1")
                    break
        return ConfigError(
            f"memory: the smallest plan (batch 1, every cap applied) needs {_mib(need)}, the profile's ceiling is "
            f"{_mib(mem_ceiling)} (weights {_mib(breakdown['weights'])}, process {_mib(breakdown['baseline'])}); "
            f"would fit: {'; '.join(hints)}")
    flops = cost.worst_flops(policy.worst_plans(caps), batch)
    return ConfigError(
        f"FLOPs: the smallest plan (batch 1, every cap applied) needs {flops:.3e} FLOPs per step, the profile's "
        f"ceiling is {flop_ceiling:.3e}; would fit: a profile with target_step_seconds >= "
        f"{flops / flop_ceiling * 1.0:.2f} x its current value, or a smaller --img-size or model")
