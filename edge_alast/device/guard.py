"""The runtime memory guard: keeps training steps under the device's ceiling, acting before a step crosses it.

Pure logic. After each step the trainer passes that step's own peak RSS (:class:`edge_alast.device.memory.PeakTracker`,
reset every step: the lifetime high-water mark never falls, so a guard reading it would tighten on every new high
and wreck the run), the caps in force and the policy in force (the stage's: Light-PEFT's fine-tuning stage has another
than its estimation stage). The guard predicts the next step with the plan's cost model, ``predict(caps, policy)``
(the worst step that policy can take under those caps), plus ``drift``: how far the measured peaks
have recently run above the model (allocator fragmentation, a baseline that grew), an exponential mean, never
below zero. Then:

* **tighten** when the next step is predicted above the ceiling, or the measured peak came above ``high`` (0.92)
  of it *and* more than ``TOLERANCE`` above the model's prediction (a plan the planner fitted between 0.92 and 1.0 of the ceiling is not
  a reason to act): one notch at a time in the planner's order (:func:`edge_alast.device.planner.tighten`: recompute,
  lowest trainable block, keep cap) until the prediction is back under ``high`` of the ceiling or nothing is
  left. Bounded: the ladder ends at every block recomputed, the top block alone trainable, keep cap
  ``KEEP_LEVELS[-1]``.
* **relax** one notch back toward the plan's caps after ``patience`` (20) steps predicted under ``high`` of the
  ceiling, when the looser caps are predicted under ``high`` too, or under the ceiling itself (the planner's own
  criterion) once the drift is back within ``TOLERANCE`` (hysteresis: no flapping between two notches).
* Every change is an event for ``metrics.jsonl``; a keep cap below ALaST's ``b_min`` says so in its event.

Without a cost model (``predict=None``) the measured peak stands in for every prediction: one notch per step
above ``high``, and relaxing after ``patience`` steps below ``low`` (0.85).
"""
from __future__ import annotations

from typing import Any, Callable

from .planner import tighten
from ..alast.policy import PolicyCaps

GUARD_HIGH = 0.92
GUARD_LOW = 0.85
GUARD_PATIENCE = 20
DRIFT_SMOOTHING = 0.5
# Measured peaks within this share of the ceiling above the model count as the model's (its allocator slack is an
# estimate): no tightening for them, and relaxing back to caps predicted between `high` and the ceiling is allowed
# once the drift is this small. Acting on smaller errors made the guard flap between two notches.
TOLERANCE = 0.01


class MemoryGuard:
    """See the module docstring.

    Args:
        ceiling_bytes: The profile's memory ceiling.
        depth: Blocks of the model.
        kind: The method's plan kind (:attr:`edge_alast.methods.MethodSpec.plan_kind`): ``full`` only recomputes,
            ``head`` has nothing to tighten.
        train_below: The embeddings train (every block then stores activations).
        predict: Predicted peak bytes of the worst step a policy can take under given caps (the plan's cost
            model); called with the policy :meth:`check` is given, so the guard holds no policy of its own.
        b_min: ALaST's lowest budget, to say when a keep cap goes below it.
    """

    def __init__(self, ceiling_bytes: int, depth: int, *, kind: str = "alast", train_below: bool = False,
                 predict: Callable[[PolicyCaps, Any], float] | None = None, b_min: float | None = None,
                 high: float = GUARD_HIGH, low: float = GUARD_LOW, patience: int = GUARD_PATIENCE):
        if not 0 < low < high <= 1:
            raise ValueError(f"thresholds must satisfy 0 < low < high <= 1, got low={low}, high={high}")
        self.ceiling_bytes = int(ceiling_bytes)
        self.depth = depth
        self.kind = kind
        self.train_below = train_below
        self.predict = predict
        self.b_min = b_min
        self.high, self.low, self.patience = high, low, patience
        self.drift = 0.0
        self.calm = 0
        self.stack: list[PolicyCaps] = []  # the caps before each tightening still in force, loosest first

    def check(self, step_peak: int, caps: PolicyCaps, policy: Any = None) -> tuple[PolicyCaps, dict | None]:
        """(caps for the next steps, event or None) after a step that peaked at ``step_peak`` bytes under ``caps``,
        for the steps ``policy`` (the stage's) decides next."""
        ceiling, limit = self.ceiling_bytes, self.high * self.ceiling_bytes

        def expected(c: PolicyCaps) -> float:
            return step_peak if self.predict is None else self.predict(c, policy) + self.drift

        if self.predict is None:
            over, calm = step_peak > limit, step_peak < self.low * ceiling
        else:
            predicted = self.predict(caps, policy)
            self.drift = max(0.0, DRIFT_SMOOTHING * self.drift + (1 - DRIFT_SMOOTHING) * (step_peak - predicted))
            # Over: the next step is predicted to cross, or this one came near the ceiling above what the model
            # allows (the plan itself may sit between `high` and the ceiling: that is not a reason to act).
            over = predicted + self.drift > ceiling or (
                step_peak > limit and step_peak > predicted + TOLERANCE * ceiling)
            calm = predicted + self.drift <= limit or self.drift <= TOLERANCE * ceiling
        if over:
            self.calm = 0
            new, actions = caps, []
            while True:
                tighter = tighten(new, self.depth, self.kind, self.train_below)
                if tighter is None:
                    actions.append("none left")
                    break
                self.stack.append(new)
                new, action = tighter
                actions.append(action)
                if self.predict is None or expected(new) <= limit:
                    break
            return new, self._event("tighten", step_peak, expected(caps), new, actions)
        self.calm = self.calm + 1 if calm else 0
        if self.calm >= self.patience and self.stack:
            looser = self.stack[-1]
            loose = expected(looser)
            if self.predict is None or loose <= limit or (self.drift <= TOLERANCE * ceiling and loose <= ceiling):
                self.stack.pop()
                self.calm = 0
                return looser, self._event("relax", step_peak, expected(caps), looser,
                                           ["back to the caps before the last tightening"])
        return caps, None

    def _event(self, kind: str, step_peak: int, expected: float, caps: PolicyCaps, actions: list[str]) -> dict:
        event = {"event": "memory_guard", "action": kind, "changes": actions, "step_peak_bytes": int(step_peak),
                 "predicted_bytes": int(expected), "drift_bytes": int(self.drift),
                 "limit_bytes": int(self.high * self.ceiling_bytes), "ceiling_bytes": self.ceiling_bytes,
                 "recompute": [i for i, r in enumerate(caps.recompute or ()) if r],
                 "max_keep": None if caps.max_keep is None else max(caps.max_keep),
                 "lowest_trainable": caps.lowest_trainable, "tightenings_in_force": len(self.stack)}
        if self.b_min is not None and caps.max_keep is not None and max(caps.max_keep) < self.b_min:
            event["warning"] = (f"keep cap {max(caps.max_keep):g} is below alast.b_min {self.b_min:g}: budgets are "
                                "held under their floor to fit the ceiling")
        return event

    def state_dict(self) -> dict:
        return {"drift": self.drift, "calm": self.calm, "stack": [c.state_dict() for c in self.stack]}

    def load_state_dict(self, state: dict) -> None:
        if "drift" not in state:  # a checkpoint of the guard before per-step peaks: nothing to carry over
            return
        self.drift = float(state["drift"])
        self.calm = int(state["calm"])
        self.stack = [PolicyCaps.from_state(c) for c in state["stack"]]
