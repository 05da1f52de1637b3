"""Step policies: decide, per training step, which blocks train and how many tokens each block keeps.

Pure: plain Python and CPU tensors in, a frozen :class:`StepPlan` out. No module surgery, no I/O. Every policy has
``decide() -> StepPlan``, ``observe(deltas)`` and ``state_dict()``/``load_state_dict()`` so a checkpoint resumes it
exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..config import COAUTHORS, AlastConfig
from ..errors import ConfigError
from ..methods import BLOCKS_NONE, MethodSpec


def eq6(budget: float, delta: float, prev_delta: float, alpha: float, b_min: float) -> float:
    """The paper's Eq. 6 for one block: clip(b + alpha * (delta^t - delta^{t-1}), b_min, 1)."""
    return min(1.0, max(b_min, budget + alpha * (delta - prev_delta)))


@dataclass(frozen=True)
class LiveBudgets:
    """Budgets the mechanism updates inside the forward that measures their deltas (the co-authors' code: block l
    keeps tokens by the budget Eq. 6 just moved with this batch's delta_l, no one-step lag).

    Pure data plus arithmetic: the policy builds it in ``decide`` and applies the same :func:`eq6` in ``observe``,
    so its budgets after a step are the ones the forward used (tested).

    Attributes:
        budgets, prev_deltas: Per block, the budget and the delta before this step.
        alpha, b_min: Eq. 6's step size and floor.
        batch_sum: The deltas are batch sums (the co-authors' ``torch.norm(...)**2`` over the batch), else means.
        max_keep: The planner's per-block caps on the keep ratio (None: none).
        anneal: Progress of the keep-ratio annealing (0: none; 1: every block at its cap or 1), see
            :func:`anneal_plan`.
    """

    budgets: tuple[float, ...]
    prev_deltas: tuple[float, ...]
    alpha: float
    b_min: float
    batch_sum: bool = True
    max_keep: tuple[float, ...] | None = None
    anneal: float = 0.0

    def budget(self, i: int, delta: float) -> float:
        return eq6(self.budgets[i], delta, self.prev_deltas[i], self.alpha, self.b_min)

    def keep_ratio(self, i: int, delta: float) -> float:
        """Block ``i``'s keep ratio this step, given its delta measured in this forward."""
        keep = self.budget(i, delta)
        cap = 1.0 if self.max_keep is None else float(self.max_keep[i])
        return _annealed(min(keep, cap), cap, self.anneal)

@dataclass(frozen=True)
class StepPlan:
    """What one training step does.

    Attributes:
        keep_ratios: Per block, the share of patch tokens kept *after* that block (1.0 keeps all). Dropping is
            cumulative: block l+1 sees what block l kept.
        trainable: Per block, whether its parameters get gradients this step.
        recompute: Per block, whether its activations are recomputed in backward instead of stored.
        count_prefix: Count kept tokens as the co-authors' code does, int(b * N) with N every token entering the
            block (class token included), instead of floor(b * patch tokens) (:func:`count_kept`).
        live: Budgets the mechanism moves within this step's forward (:class:`LiveBudgets`); ``keep_ratios`` are
            then the budgets before the step, and the mechanism reports the ratios it applied.
    """

    keep_ratios: tuple[float, ...]
    trainable: tuple[bool, ...]
    recompute: tuple[bool, ...] = ()
    count_prefix: bool = False
    live: LiveBudgets | None = None

    def __post_init__(self):
        depth = len(self.keep_ratios)
        if len(self.trainable) != depth:
            raise ValueError(f"StepPlan: {len(self.trainable)} trainable flags for {depth} blocks")
        if not self.recompute:
            object.__setattr__(self, "recompute", (False,) * depth)
        elif len(self.recompute) != depth:
            raise ValueError(f"StepPlan: {len(self.recompute)} recompute flags for {depth} blocks")
        for r in self.keep_ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"StepPlan: keep ratio {r} outside (0, 1]")

    @property
    def depth(self) -> int:
        return len(self.keep_ratios)

    @property
    def lowest_trainable(self) -> int | None:
        return next((i for i, t in enumerate(self.trainable) if t), None)


@dataclass(frozen=True)
class PolicyCaps:
    """Limits a planner puts on a policy (from a device profile's memory and FLOP ceilings).

    Attributes:
        max_keep: Per block, the highest keep ratio the block may use (None: no cap).
        max_trainable: The most blocks that may train in one step (None: no cap).
        lowest_trainable: The lowest block index that may train (blocks below never train, so store nothing).
        recompute: Per block, whether to recompute its activations in backward.
    """

    max_keep: tuple[float, ...] | None = None
    max_trainable: int | None = None
    lowest_trainable: int = 0
    recompute: tuple[bool, ...] | None = None

    def state_dict(self) -> dict:
        """Plain values (checkpoints load with ``weights_only=True``)."""
        return {"max_keep": None if self.max_keep is None else list(self.max_keep),
                "max_trainable": self.max_trainable, "lowest_trainable": self.lowest_trainable,
                "recompute": None if self.recompute is None else list(self.recompute)}

    @classmethod
    def from_state(cls, state: dict) -> "PolicyCaps":
        as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
        return cls(max_keep=as_tuple(state["max_keep"]), max_trainable=state["max_trainable"],
                   lowest_trainable=state["lowest_trainable"], recompute=as_tuple(state["recompute"]))


def count_kept(num_tokens: int, ratio: float, multiple: int = 1, count_prefix: int = 0) -> int:
    """Patch tokens kept out of ``num_tokens`` at ``ratio``: floor(ratio*N) (ALaST), at least 1.

    ``count_prefix`` > 0: the co-authors' count, int(ratio * (N + count_prefix)), the prefix tokens counted in the
    total (their ``int(b * x.shape[1])``), at most N. ``multiple`` > 1 rounds the count down to a multiple of it
    (never below ``multiple`` or above N), which bounds the number of distinct activation shapes (allocator reuse,
    FLOP-count cache size).
    """
    if ratio >= 1.0:
        return num_tokens
    keep = max(1, math.floor(ratio * (num_tokens + count_prefix)))
    if multiple > 1 and num_tokens > multiple:
        keep = max(multiple, keep - keep % multiple)
    return min(keep, num_tokens)


def tokens_per_block(tokens_in: int, prefix: int, keep_ratios: Sequence[float], multiple: int = 1,
                     count_prefix: bool = False) -> list[int]:
    """Tokens entering each block when each keeps its ratio of the patch tokens it received (cumulative), and the
    tokens leaving the last block as the final element (``count_prefix``: the co-authors' count, see
    :func:`count_kept`)."""
    tokens, n = [], tokens_in
    for r in keep_ratios:
        tokens.append(n)
        n = count_kept(n - prefix, r, multiple, prefix if count_prefix else 0) + prefix
    return tokens + [n]


def anneal_progress(step: int, total_steps: int, fraction: float) -> float:
    """How far step ``step`` (0-based) of ``total_steps`` is into the annealing of the last ``fraction`` of the run:
    0 before it, rising linearly to 1 at the last step. Depends on the step alone, so a resumed run anneals alike."""
    window = round(fraction * total_steps)
    if fraction <= 0 or window < 1:
        return 0.0
    start = total_steps - window
    return 0.0 if step < start else min(1.0, (step - start + 1) / window)


def _annealed(keep: float, cap: float, t: float) -> float:
    if t <= 0.0 or keep >= cap:
        return keep
    return cap if t >= 1.0 else (1.0 - t) * keep + t * cap


def anneal_plan(plan: StepPlan, t: float, caps: PolicyCaps | None = None) -> StepPlan:
    """``plan`` with every keep ratio moved a share ``t`` of the way to 1 (or to its cap under ``caps``), this
    project's remedy for the train/eval token mismatch (``alast.anneal_last``): at ``t`` = 1 training sees every
    token, as evaluation does. Layer freezing is left as it is."""
    if t <= 0.0:
        return plan
    max_keep = caps.max_keep if caps is not None and caps.max_keep is not None else (1.0,) * plan.depth
    keep = tuple(_annealed(r, float(c), t) for r, c in zip(plan.keep_ratios, max_keep))
    live = replace(plan.live, anneal=t) if plan.live is not None else None
    return replace(plan, keep_ratios=keep, live=live)


class StaticPolicy:
    """Baselines in the same engine: ``full`` (every block trains, all tokens) and ``head`` (no block trains)."""

    delta_reduction = "mean"

    def __init__(self, depth: int, train_blocks: bool, recompute: Sequence[bool] | None = None):
        self.depth = depth
        self._plan = StepPlan(
            keep_ratios=(1.0,) * depth,
            trainable=(train_blocks,) * depth,
            recompute=tuple(recompute) if recompute else (),
        )

    def decide(self, caps: PolicyCaps | None = None) -> StepPlan:
        """Every block from ``caps.lowest_trainable`` up trains (none for head-only), every token; recomputation as
        the caps say (the memory guard may add some)."""
        plan = self._plan
        if caps is not None and caps.lowest_trainable > 0 and plan.trainable[0]:
            plan = replace(plan, trainable=tuple(i >= caps.lowest_trainable for i in range(self.depth)))
        if caps is not None and caps.recompute is not None and tuple(caps.recompute) != plan.recompute:
            plan = replace(plan, recompute=tuple(caps.recompute))
        return plan

    @property
    def budgets(self) -> list[float]:
        """No budgets: every block keeps every token (for metrics that compare with ALaST's)."""
        return [1.0] * self.depth

    def trainable_count(self, caps: PolicyCaps | None = None) -> int:
        """Blocks trained per step: every block, or none."""
        return sum(self.decide(caps).trainable)

    def worst_plans(self, caps: PolicyCaps | None = None) -> list[StepPlan]:
        """The plans to cost for the most expensive step under ``caps``: this policy's only plan."""
        return [self.decide(caps)]

    def observe(self, deltas: Sequence[float], stream: Sequence[float] | None = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# With batch-mean deltas, alpha = lr * ALPHA_REFERENCE_BATCH reproduces the reference code's update (alpha = lr on
# batch-summed deltas) at batch 16, while the dynamics no longer depend on the batch size.
ALPHA_REFERENCE_BATCH = 16


def default_alpha(lr: float) -> float:
    """ALaST's budget step size for a learning rate (see :class:`AlastPolicy`)."""
    return lr * ALPHA_REFERENCE_BATCH


class AlastPolicy:
    """ALaST: per-block compute budgets from class-token importance (Adaptive Layer Selection, arXiv 2408.08670).

    Choices, and where each comes from:

    * Importance. For block l at step t, delta_l = ||CLS_out - CLS_in||^2 (squared L2 norm of the change the block
      makes to the class token), detached (paper Sec. 3.2). The co-authors' reference code sums it over the batch;
      here it is the *batch mean*, so that the size of an update does not grow with the batch. The mechanism
      (:mod:`edge_alast.alast.patch`) measures it, and the batch mean of ||CLS_in||^2 beside it (``stream``).
    * ``update="reference"`` (the paper's Eq. 6, with this project's choices where the paper is silent; its
      divergences from the paper and from the co-authors' code are listed in docs/alast.md):
      b_l <- clip(b_l + alpha * (delta_l^t - delta_l^{t-1}), b_min, 1); the first observed step only records
      delta^0; the plan is made before the forward, so a step uses the budgets of the step before. ``alpha``
      defaults to ``lr * 16``: the co-authors use alpha = lr with batch-summed deltas, which equals lr*16 with
      batch-mean deltas at batch 16; fixed, not scaled with the actual batch, so the dynamics are batch-size
      independent (tested).
    * ``update="coauthors"`` (reproduction of Federico-Alvetreti/Split-Learning_ADC ``methods/alast.py`` at
      4b02f27): delta is the batch *sum*, alpha defaults to lr, delta^{-1} = 0 (the first step adds
      alpha*delta^0), each block's budget moves inside the forward that measures its delta and that same forward
      keeps int(b*N) patch tokens, N counting the class token (:class:`LiveBudgets`, ``StepPlan.count_prefix``);
      the run defaults to Adam without weight decay and trained embeddings (config.py). Measured on the shared ViT-S/14 (DINOv2) it cannot work as intended:
      delta spans four orders of magnitude across blocks (about 0.2 in block 3, 2400 in block 11) because the
      residual stream grows with depth, one alpha serves all, and the update telescopes to
      b_l = b_init + alpha * (delta_l^t - delta_l^0): budgets track the change of delta since step 0, not its
      level. Blocks 0-8 stayed at 0.900 +- 0.003 and block 11 jumped between b_min and 1.
    * ``update="relative"`` (this project's): importance is the class token's *relative* change,
      rho_l = delta_l / ||CLS_in,l||^2, which is scale-free (the same for a block whose residual stream is 1000x
      larger) and comparable across blocks. On the shared ViT-S/14 it is stable from batch to batch (< 3 %) and
      shows the pattern the paper reports: block 0 high (3.4), central blocks low (0.06-0.15), block 11 highest
      (7). Its log is smoothed over steps (exponential mean, ``smoothing`` 0.9) and standardised across blocks
      (z_l); the budgets are b_l = b_min + (1 - b_min) * sigmoid(spread * z_l + c), with c set so that the mean
      budget is ``b_init``: the run spends the reference's nominal compute, distributed by importance instead of
      evenly. Importance comes from the level of rho, not its difference, so nothing telescopes.
    * ``update="static"`` / ``"random"``: baselines in the same engine. Fixed per-block keep ratios
      (``keep_ratios``, e.g. an ALaST run's means) and either the same ``trainable_blocks`` every step (static)
      or K blocks drawn uniformly each step (random). They answer whether adapting per step earns its keep.
    * Defaults b_init = 0.9 and b_min = 0.5 are the paper's.
    * Tokens. The budget is the keep ratio of the block: after block l, in training, the prefix tokens plus the
      top floor(b_l * N) patch tokens by block l's class-token attention are kept, N being the current count
      (cumulative). Carried out by the mechanism from ``StepPlan.keep_ratios``.
    * Freezing. Each step, K blocks train, sampled without replacement from softmax(budgets / temperature) for
      ``reference`` (paper Sec. 3.3, temperature 1 in the paper) -- budgets in [0.5, 1] make that nearly uniform
      (probabilities differ by at most e^0.5 = 1.65x) -- and from softmax(standardised budgets / temperature) for
      ``relative``, a temperature derived from the budgets' spread, so a block one standard deviation more
      important is e^1 = 2.7x likelier to train. ``sampling="topk"`` takes the K highest budgets instead
      (deterministic, ties to the lower index). K defaults to ceil(3/4 of depth) (9 of 12; configurable).
    * Caps (:class:`PolicyCaps`) from the planner are inputs: they bound keep ratios, K and the lowest trainable
      block; they never change the budgets themselves, so removing a cap restores the policy's own behaviour.
    * Budgets change only when ``observe`` is called, which the trainer does for training steps only.
    * Determinism. Sampling uses a private ``torch.Generator`` seeded with ``seed``; its state, the budgets and the
      smoothed importances are in ``state_dict``, so a resumed run draws the same blocks.
    """

    def __init__(self, depth: int, config: AlastConfig | None = None, *, lr: float = 1e-4):
        self.config = config or AlastConfig()
        self.config.validate(depth)
        self.depth = depth
        self.update = self.config.update
        coauthors = self.update == COAUTHORS
        default = lr if coauthors else default_alpha(lr)  # theirs: alpha = lr on batch sums
        self.alpha = self.config.alpha if self.config.alpha is not None else default
        self.delta_reduction = "sum" if coauthors else "mean"
        # alast.freeze off: every block trains every step (token dropping only)
        self.k = depth if not self.config.freeze else (self.config.k_trainable or math.ceil(0.75 * depth))
        fixed = self.update in ("static", "random")
        if fixed and self.config.keep_ratios is None:
            raise ConfigError(f"alast.update {self.update}: needs alast.keep_ratios (or --alast-from RUN_DIR)")
        if self.update == "static" and self.config.trainable_blocks is None:
            raise ConfigError("alast.update static: needs alast.trainable_blocks (or --alast-from RUN_DIR)")
        self.budgets = [float(r) for r in self.config.keep_ratios] if fixed else [float(self.config.b_init)] * depth
        # coauthors: their blocks start with delta = 0, so the first step adds alpha * delta^0
        self.prev_deltas: list[float] | None = [0.0] * depth if coauthors else None
        self.importance: list[float] | None = None  # relative: smoothed log rho per block
        self._gen = torch.Generator().manual_seed(int(self.config.seed or 0))

    # -- deciding -----------------------------------------------------------------------------------------------
    def trainable_count(self, caps: PolicyCaps | None = None) -> int:
        """K under ``caps``: the configured K, at most ``caps.max_trainable`` and the blocks from the lowest
        trainable one up."""
        caps = caps or PolicyCaps()
        return min(self.k, caps.max_trainable or self.depth, self.depth - max(0, caps.lowest_trainable))

    def decide(self, caps: PolicyCaps | None = None) -> StepPlan:
        caps = caps or PolicyCaps()
        keep = list(self.budgets)
        if caps.max_keep is not None:
            keep = [min(b, c) for b, c in zip(keep, caps.max_keep)]
        trainable = [False] * self.depth
        for i in self._choose(self.trainable_count(caps), max(0, caps.lowest_trainable)):
            trainable[i] = True
        recompute = tuple(caps.recompute) if caps.recompute is not None else ()
        if self.update != COAUTHORS:
            return StepPlan(keep_ratios=tuple(keep), trainable=tuple(trainable), recompute=recompute)
        live = LiveBudgets(tuple(self.budgets), tuple(self.prev_deltas), self.alpha, self.config.b_min,
                           max_keep=None if caps.max_keep is None else tuple(caps.max_keep))
        return StepPlan(keep_ratios=tuple(keep), trainable=tuple(trainable), recompute=recompute, count_prefix=True,
                        live=live)

    def worst_plans(self, caps: PolicyCaps | None = None) -> list[StepPlan]:
        """The plans :meth:`decide` can return under ``caps`` at their most expensive, for a planner to cost.

        Budgets sit at their caps (every token without one; fixed keep ratios stay as they are unless they anneal,
        ``anneal_last``, which raises them to their caps by the run's last step) and the lowest
        trainable block is ``caps.lowest_trainable``. The other K-1 trainable blocks are placed three ways (the
        costliest is the planner's to find): on the lowest non-recomputed blocks (the most tokens, so the most
        stored activations: a recomputed block keeps only its input whether it trains or not), on the lowest blocks
        (most FLOPs), on the top blocks (their gradients exist while everything below is still stored).
        ``static`` trains its own blocks only.
        """
        caps = caps or PolicyCaps()
        depth = self.depth
        recompute = tuple(caps.recompute) if caps.recompute is not None else (False,) * depth
        fixed = self.update in ("static", "random") and not self.config.anneal_last  # None before config fills it
        ceiling = list(self.budgets) if fixed else [1.0] * depth
        keep = tuple(min(b, c) for b, c in zip(ceiling, caps.max_keep or ceiling))
        if self.update == "static":
            return [replace(self.decide(caps), keep_ratios=keep, recompute=recompute)]
        lo, k = max(0, caps.lowest_trainable), self.trainable_count(caps)
        if k <= 0:
            return [StepPlan(keep, (False,) * depth, recompute)]
        # Tokens never grow with depth, so the lowest blocks hold the most.
        rest = sorted(range(lo + 1, depth), key=lambda i: (recompute[i], i))[:k - 1]
        placements = {
            tuple(i == lo or i in rest for i in range(depth)),
            tuple(lo <= i < lo + k for i in range(depth)),
            tuple(i == lo or i >= depth - (k - 1) for i in range(depth)),
        }
        return [StepPlan(keep, t, recompute) for t in sorted(placements)]

    def _choose(self, k: int, lo: int) -> list[int]:
        candidates = list(range(lo, self.depth))
        if k <= 0:
            return []
        if self.update == "static":
            return sorted(i for i in self.config.trainable_blocks if i >= lo)[:k]
        scores = torch.tensor([self.budgets[i] for i in candidates], dtype=torch.float64)
        if self.update == "random":
            scores = torch.zeros_like(scores)  # uniform
        elif self.update == "relative" and len(candidates) > 1 and float(scores.std()) > 0:
            scores = (scores - scores.mean()) / scores.std()  # the temperature follows the budgets' spread
        if self.config.sampling == "topk" and self.update != "random":
            order = sorted(range(len(candidates)), key=lambda j: (-scores[j].item(), j))[:k]
        else:
            probs = torch.softmax(scores / self.config.temperature, dim=0)
            order = torch.multinomial(probs, k, replacement=False, generator=self._gen).tolist()
        return sorted(candidates[j] for j in order)

    # -- observing ----------------------------------------------------------------------------------------------
    def observe(self, deltas: Sequence[float], stream: Sequence[float] | None = None) -> None:
        """Update budgets from this training step's per-block importances (delta_l reduced over the batch as
        ``delta_reduction`` says: the mean, or the sum for ``coauthors``; and for ``relative`` the batch-mean
        ||CLS_in,l||^2 in ``stream``)."""
        if len(deltas) != self.depth:
            raise ValueError(f"expected {self.depth} deltas, got {len(deltas)}")
        deltas = [float(d) for d in deltas]
        if self.update in ("reference", COAUTHORS):
            if self.prev_deltas is not None:  # coauthors: always (delta^{-1} = 0)
                self.budgets = [eq6(b, d, p, self.alpha, self.config.b_min)
                                for b, d, p in zip(self.budgets, deltas, self.prev_deltas)]
            self.prev_deltas = deltas
        elif self.update == "relative":
            if stream is None or len(stream) != self.depth:
                raise ValueError("the relative update needs the class token's squared norm entering each block")
            logs = [math.log(max(d, 1e-30) / max(float(n), 1e-30)) for d, n in zip(deltas, stream)]
            beta = self.config.smoothing
            self.importance = logs if self.importance is None else [
                beta * s + (1 - beta) * x for s, x in zip(self.importance, logs)]
            self.budgets = relative_budgets(self.importance, self.config.b_init, self.config.b_min,
                                            self.config.spread)

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "budgets": list(self.budgets),
            "prev_deltas": None if self.prev_deltas is None else list(self.prev_deltas),
            "importance": None if self.importance is None else list(self.importance),
            "generator": self._gen.get_state(),
            "alpha": self.alpha,
            "k": self.k,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["budgets"]) != self.depth:
            raise ValueError(f"policy state has {len(state['budgets'])} budgets, model has {self.depth} blocks")
        self.budgets = [float(b) for b in state["budgets"]]
        self.prev_deltas = None if state["prev_deltas"] is None else [float(d) for d in state["prev_deltas"]]
        importance = state.get("importance")
        self.importance = None if importance is None else [float(v) for v in importance]
        self._gen.set_state(state["generator"])
        self.alpha = float(state["alpha"])
        self.k = int(state["k"])


def relative_budgets(importance: Sequence[float], b_init: float, b_min: float, spread: float) -> list[float]:
    """Budgets in [b_min, 1] that rise with ``importance`` (standardised across blocks, times ``spread``, through a
    sigmoid) and average ``b_init`` (the offset found by bisection; the mean is monotone in it)."""
    n = len(importance)
    if b_init >= 1.0 or b_min >= 1.0:
        return [1.0] * n
    if b_init <= b_min:
        return [float(b_min)] * n
    mean = sum(importance) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in importance) / n)
    z = [(v - mean) / std if std > 0 else 0.0 for v in importance]

    def budgets(c: float) -> list[float]:
        return [b_min + (1.0 - b_min) / (1.0 + math.exp(-(spread * zi + c))) for zi in z]

    lo, hi = -50.0, 50.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if sum(budgets(mid)) / n < b_init:
            lo = mid
        else:
            hi = mid
    return budgets((lo + hi) / 2)


def make_policy(spec: MethodSpec, stage: str, depth: int, config: AlastConfig | None = None, *,
                lr: float = 1e-4) -> AlastPolicy | StaticPolicy:
    """The policy a method uses in ``stage``: ALaST's budgets, or every block (none, for head-only) every step."""
    if spec.uses_alast(stage):
        return AlastPolicy(depth, config, lr=lr)
    return StaticPolicy(depth, train_blocks=spec.blocks != BLOCKS_NONE)
