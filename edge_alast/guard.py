"""The runtime memory guard: tightens the policy caps when the measured RSS comes near the device's ceiling.

Pure logic: the trainer passes a reading and the caps in force; the guard returns the caps for the steps that
follow and an event for ``metrics.jsonl``. It tightens in the planner's order (:func:`edge_alast.planner.tighten`).
"""
from __future__ import annotations

from .planner import tighten
from .policy import PolicyCaps

GUARD_THRESHOLD = 0.92


class MemoryGuard:
    """Tightens the caps one notch per new high reading above ``threshold * ceiling``.

    Use the kernel's high-water mark (``peak_rss_bytes()``) as the reading, so a peak inside a step is seen; a
    high-water mark that stays put does not tighten again. ``kind`` is the method's plan kind
    (:attr:`edge_alast.methods.MethodSpec.plan_kind`): ``full`` only recomputes, ``head`` has nothing to tighten;
    ``train_below``: the embeddings train.
    """

    def __init__(self, ceiling_bytes: int, depth: int, *, kind: str = "alast", train_below: bool = False,
                 threshold: float = GUARD_THRESHOLD):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.ceiling_bytes = int(ceiling_bytes)
        self.depth = depth
        self.kind = kind
        self.train_below = train_below
        self.threshold = threshold
        self.last_trigger = 0

    @property
    def limit_bytes(self) -> int:
        return int(self.threshold * self.ceiling_bytes)

    def check(self, rss_bytes: int, caps: PolicyCaps) -> tuple[PolicyCaps, dict | None]:
        """(caps for the next steps, event or None)."""
        if rss_bytes < self.limit_bytes or rss_bytes <= self.last_trigger:
            return caps, None
        self.last_trigger = int(rss_bytes)
        tighter = tighten(caps, self.depth, self.kind, self.train_below)
        new, action = tighter if tighter is not None else (caps, "none left")
        event = {"event": "memory_guard", "rss_bytes": int(rss_bytes), "limit_bytes": self.limit_bytes,
                 "ceiling_bytes": self.ceiling_bytes, "action": action,
                 "recompute": [i for i, r in enumerate(new.recompute or ()) if r],
                 "max_keep": None if new.max_keep is None else max(new.max_keep),
                 "lowest_trainable": new.lowest_trainable}
        return new, event

    def state_dict(self) -> dict:
        return {"last_trigger": self.last_trigger}

    def load_state_dict(self, state: dict) -> None:
        self.last_trigger = int(state["last_trigger"])
