"""Ceiling-aware planning: the memory/FLOP cost model of a training step, the planner that caps a policy so the
worst step it can produce fits a device profile, and the runtime guard that tightens the caps when RSS runs high.

One module holds the cost model; the planner, the run summary and ``tools/bench_planner.py`` all use it.

Memory model (bytes of the training process at its peak)::

    peak = baseline                          RSS at plan time less the model's weights (interpreter, torch, timm,
                                             data pipeline), measured with psutil
         + weights                           every parameter (fp32)
         + optimizer state                   AdamW/Adam: 2 states per parameter that can ever train under the caps
         + max over the step's phases of     (see ``CostModel.peak``)
             saved activations               per block kind, calibrated (below)
             + gradients of the blocks already through backward
             + the backward transient of the block in backward (and, recomputed, its re-run activations)
           and of evaluation (no-grad forward at the eval batch) and of saving the weights (one more copy)
         + allocator slack                   ``ALLOCATOR_SLACK`` x the saved activations (see its comment;
                                             ``ALLOCATOR_SLACK_ADAPTERS`` for models with LoRA adapters)

Calibration (once per run, by measurement, on a copy of one block at batch 2 and 4): under
``torch.autograd.graph.saved_tensors_hooks`` the unique storages (by data pointer) a block saves for backward are
counted for each backward kind of :mod:`edge_alast.flops` (``weight``: the lowest trainable block; ``both``: a
trainable block above it; ``input``: a frozen block above a trainable one); a recomputed block saves only its input;
a ``fwd`` block (below the lowest trainable) saves nothing. Saved bytes are fitted as ``a*B*N + p*B + c`` from
three runs ((B, N) = (2, N), (2, N/2), (4, N)); ``c`` holds the bf16 weight copies autocast keeps for backward.
Backward and evaluation transients are the peak of live tensor bytes (a dispatch mode that follows every tensor an
op returns until it is freed) above what was live before, fitted the same way.

FLOPs come from :class:`edge_alast.flops.StepFlopCounter` (the one FLOP model), plus one forward of each recomputed
block.
"""
from __future__ import annotations

import copy
import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ConfigError
from .flops import StepFlopCounter, block_kinds, trainable_flags
from .lora import LoRALinear
from .memory import rss_bytes
from .policy import AlastConfig, PolicyCaps, count_kept

__all__ = ["BlockCoefficients", "Calibration", "CostModel", "MemoryGuard", "RunPlan", "calibrate", "plan_run",
           "saved_tensor_bytes"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_STATES = 2  # AdamW/Adam: exp_avg and exp_avg_sq, each the parameter's size and dtype
# Peak RSS above the live tensor bytes, as a share of the step's saved activations: inside a step glibc cannot
# hand back the heap that the forward's freed intermediates fragment between saved tensors (malloc_trim runs only
# after the step). Measured, not derived: with the live tensor bytes predicted exactly (tests), full fine-tuning
# of ViT-S/14 fp32 at batch 16 peaked 0.40 x its activations above them at both 112 px (132 of 335 MiB) and 224 px
# (524 of 1324 MiB) on glibc 2.x / torch 2.13 CPU. tools/bench_planner.py re-checks it.
ALLOCATOR_SLACK = 0.40
# The same with LoRA adapters in the blocks: each adapter saves a small [B, N, r] tensor (A x) that stays live
# between the large transient tensors of the forward, and the heap fragments much more. Measured on the shared
# ViT-S/14 at 224 px, batch 16, fp32: LoRA peaked 2847 and 2969 MiB in two runs against 1704 MiB of predicted
# live bytes (0.98 and 1.08 x its 1170 MiB of activations); with glibc's mmap threshold pinned
# (MALLOC_MMAP_THRESHOLD_=131072) the same LoRA run peaked at 1692 MiB, i.e. the live bytes. 1.15 leaves a margin
# over the worst of those runs; Light-PEFT's estimation stage then predicts 3099 MiB against 2945 measured.
ALLOCATOR_SLACK_ADAPTERS = 1.15
# save_model: safetensors.torch.save_model turns each tensor into a bytes object before writing, so the weights
# exist once more while the file is written (was 3 copies with a clone and an in-memory file; head-only runs,
# where saving sets the peak, measured 515 MiB vs 514 predicted with 1).
SAVE_WEIGHT_COPIES = 1
KEEP_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # max_keep caps the planner tries, in order
GUARD_THRESHOLD = 0.92
# Calibration runs at this batch and twice it: large enough that transients are not lost in rounding, small
# enough to take well under a second for ViT-S.
CALIBRATION_BATCH = 2


# ================================================================================================================
# Measuring: saved tensors and live tensor bytes
# ================================================================================================================


class _SavedBytes:
    """Counts unique storages saved for backward (by data pointer), leaving out the given (parameter) storages."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []

    def pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in self.exclude and ptr not in self.seen:
                self.seen[ptr] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def saved_tensor_bytes(fn, exclude: Sequence[torch.Tensor] = ()) -> tuple[int, object]:
    """Bytes of the unique storages autograd saves while ``fn()`` runs (``exclude``: e.g. the parameters).

    Returns (bytes, fn's result); keep the result alive only as long as you need the graph.
    """
    counter = _SavedBytes({p.untyped_storage().data_ptr() for p in exclude})
    with counter.hooks():
        out = fn()
    return counter.total, out


class _LiveBytes(TorchDispatchMode):
    """Follows every tensor an op returns until it is freed; ``peak`` is the highest sum of live storage bytes."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors referring to it]
        self.now = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if id(t) in self._tracked:
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if not ptr or ptr in self.exclude:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [st.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        self._tracked.add(id(t))
        weakref.finalize(t, self._release, ptr, id(t))

    def _release(self, ptr: int, tid: int) -> None:
        self._tracked.discard(tid)
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def reset_peak(self) -> int:
        self.peak = self.now
        return self.now


# ================================================================================================================
# Calibration
# ================================================================================================================


@dataclass(frozen=True)
class BlockCoefficients:
    """Bytes as ``per_token * B * N + per_image * B + constant`` (B images, N tokens)."""

    per_token: float
    per_image: float = 0.0
    constant: float = 0.0

    def __call__(self, batch: int, tokens: int) -> float:
        return self.per_token * batch * tokens + self.per_image * batch + self.constant

    @classmethod
    def fit(cls, n1: int, n2: int, y11: float, y12: float, y21: float, b: int = 1) -> "BlockCoefficients":
        """From bytes at (B, N) = (b, n1) -> y11, (b, n2) -> y12, (2b, n1) -> y21; clamped at >= 0."""
        a = max(0.0, (y11 - y12) / (b * (n1 - n2))) if n1 != n2 else 0.0
        p = max(0.0, (y21 - y11) / b - a * n1)
        c = max(0.0, y11 - b * (a * n1 + p))
        return cls(a, p, c)


@dataclass(frozen=True)
class Calibration:
    """Measured memory coefficients of one model at one precision (see the module docstring).

    Attributes:
        saved: Saved-for-backward bytes of one block, per backward kind (``weight``, ``both``, ``input``).
        recompute_per_token: Bytes a recomputed block keeps (its input) per image and token.
        backward: Live bytes a block's backward adds on top of what was live (its parameter grads excluded).
        forward: Live bytes a no-grad forward of a block adds on top of its input (evaluation).
        tail: Saved bytes of the final norm and head, for tokens leaving the last block, keyed by whether the
            norm trains (or passes grads down).
        stem: Saved bytes of the patch embedding when it trains (per image).
        token_index_bytes: Bytes per kept token of the index a token selection saves for backward.
    """

    saved: dict[str, BlockCoefficients]
    recompute_per_token: float
    backward: BlockCoefficients
    forward: BlockCoefficients
    tail: dict[bool, BlockCoefficients]
    stem: BlockCoefficients
    token_index_bytes: int = 8
    precision: str = "fp32"


def _autocast(device: str, precision: str):
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type=device, dtype=dtype) if dtype is not None else nullcontext()


def _block_measure(block: nn.Module, batch: int, tokens: int, dim: int, kind: str, device: str,
                   precision: str) -> tuple[int, int, int]:
    """(saved bytes, backward transient, no-grad forward transient) of one block at (batch, tokens)."""
    params = list(block.parameters())
    exclude = {p.untyped_storage().data_ptr() for p in params}
    need_weight = kind in ("weight", "both")
    need_input = kind in ("input", "both")
    # A weight-gradient kind trains what can train in this block (its adapters for LoRA; all of it otherwise).
    flags = [p.requires_grad for p in params]
    train = trainable_flags(block)
    trains = [p for p, t in zip(params, train) if t]
    for p, t in zip(params, train):
        p.requires_grad_(need_weight and t)
        p.grad = None
    x = torch.randn(batch, tokens, dim, device=device)
    if need_input:
        x.requires_grad_(True)
    # Gradients allocated up front and left out: they are costed apart (they outlive the block's backward).
    grads = [torch.zeros_like(p) for p in trains] if need_weight else []
    for p, g in zip(trains, grads):
        p.grad = g
    with _LiveBytes(exclude | {g.untyped_storage().data_ptr() for g in grads}) as live:
        counter = _SavedBytes(exclude)
        with counter.hooks(), _autocast(device, precision):
            y = block(x)
        saved = counter.total
        before = live.reset_peak()
        y.float().sum().backward()
        backward = max(0, live.peak - before)
        del y
    for p, f in zip(params, flags):
        p.grad = None
        p.requires_grad_(f)
    with torch.no_grad(), _LiveBytes(exclude) as live:
        xi = x.detach().clone()
        before = live.reset_peak()
        with _autocast(device, precision):
            out = block(xi)
        forward = max(0, live.peak - before)
        del out, xi
    return saved, backward, forward


def calibrate(model: nn.Module, *, img_size: int, precision: str = "fp32", device: str = "cpu") -> Calibration:
    """Measure the memory coefficients of ``model`` (a timm ViT) at ``precision`` on ``device``.

    Runs a copy of block 0 (and the model's own norm/head/patch embedding, gradients restored afterwards) at batch
    2 and 4 (norm/head at 1 and 2) for the model's full token count and half of it: a few hundred ms for ViT-S on a CPU.
    """
    blocks = getattr(model, "blocks", None)
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no `blocks`: the planner needs a timm ViT-style model")
    block = copy.deepcopy(blocks[0]).to(device).train()
    dim = block.norm1.normalized_shape[0]
    n1 = full_tokens(model, img_size)
    n2 = max(getattr(model, "num_prefix_tokens", 1) + 1, n1 // 2)
    saved, backward, forward = {}, None, None
    b = CALIBRATION_BATCH
    for kind in ("weight", "both", "input"):
        m11 = _block_measure(block, b, n1, dim, kind, device, precision)
        m12 = _block_measure(block, b, n2, dim, kind, device, precision)
        m21 = _block_measure(block, 2 * b, n1, dim, kind, device, precision)
        saved[kind] = BlockCoefficients.fit(n1, n2, m11[0], m12[0], m21[0], b)
        if kind == "both":
            backward = BlockCoefficients.fit(n1, n2, m11[1], m12[1], m21[1], b)
            forward = BlockCoefficients.fit(n1, n2, m11[2], m12[2], m21[2], b)
    del block

    # Tail: final norm + pooling + head (on the model itself; requires_grad restored afterwards).
    tail_modules = [m for m in (getattr(model, "norm", None), getattr(model, "fc_norm", None),
                                getattr(model, "head", None), getattr(model, "head_dist", None)) if m is not None]
    tail_params = [p for m in tail_modules for p in m.parameters()]
    flags = [p.requires_grad for p in tail_params]
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None)) if m is not None]
    head_params = [p for m in heads for p in m.parameters()]
    was_training = model.training
    model.train()
    tail = {}
    try:
        for norm_trains in (True, False):
            ys = []
            for batch, tokens in ((1, n1), (1, n2), (2, n1)):
                for p in tail_params:
                    p.requires_grad_(norm_trains or any(p is h for h in head_params))
                x = torch.randn(batch, tokens, dim, device=device)

                def run(x=x):
                    with _autocast(device, precision):
                        return model.forward_head(model.norm(x))
                ys.append(saved_tensor_bytes(run, exclude=tail_params)[0])
            tail[norm_trains] = BlockCoefficients.fit(n1, n2, *ys)
        # Stem: the patch embedding's saved input when it trains (the image, or its bf16 copy).
        stem_params = list(model.patch_embed.parameters())
        stem_flags = [p.requires_grad for p in stem_params]
        for p in stem_params:
            p.requires_grad_(True)
        ys = []
        for batch in (1, 1, 2):
            img = torch.randn(batch, 3, img_size, img_size, device=device)

            def run(img=img):
                with _autocast(device, precision):
                    return model.patch_embed(img)
            ys.append(saved_tensor_bytes(run, exclude=stem_params)[0])
        stem = BlockCoefficients(0.0, max(0.0, ys[2] - ys[0]), max(0.0, 2 * ys[0] - ys[2]))
        for p, f in zip(stem_params, stem_flags):
            p.requires_grad_(f)
    finally:
        for p, f in zip(tail_params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    stream = next(model.parameters()).element_size()  # the residual stream stays in the parameters' dtype
    return Calibration(saved=saved, recompute_per_token=float(stream * dim), backward=backward, forward=forward,
                       tail=tail, stem=stem, precision=precision)


def full_tokens(model: nn.Module, img_size: int) -> int:
    """Tokens entering block 0: patches at ``img_size`` plus the prefix tokens."""
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (img_size // ph) * (img_size // pw) + int(getattr(model, "num_prefix_tokens", 1))


# ================================================================================================================
# Cost model
# ================================================================================================================


@dataclass(frozen=True)
class StepShape:
    """The worst-case shape of a step for costing: images, tokens entering each block, flags per block."""

    batch_size: int
    tokens: tuple[int, ...]
    tokens_out: int
    trainable: tuple[bool, ...]
    recompute: tuple[bool, ...]
    keep_ratios: tuple[float, ...]


class CostModel:
    """Predicts peak memory and FLOPs of training steps of one model at one image size and precision.

    Args:
        model: The timm ViT (weights as they will train; on its device).
        calibration: From :func:`calibrate` for this model and precision.
        img_size: Input side in pixels.
        method: ``alast``, ``full`` or ``head``.
        baseline_bytes: Process bytes that are not the model: RSS at plan time less the weights.
        train_embeddings: Whether the patch embedding trains (``full`` always does).
        eval_batch_size: Images per evaluation batch.
        token_multiple: As for :func:`edge_alast.policy.count_kept`.
        flop_counter: A :class:`StepFlopCounter` for the model (made when not given).
    """

    def __init__(self, model: nn.Module, calibration: Calibration, *, img_size: int, method: str,
                 baseline_bytes: int, train_embeddings: bool | None = None, eval_batch_size: int = 64,
                 token_multiple: int = 1, flop_counter: StepFlopCounter | None = None):
        self.cal = calibration
        self.img_size = img_size
        self.method = method
        self.depth = len(model.blocks)
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.tokens_in = full_tokens(model, img_size)
        self.baseline_bytes = int(baseline_bytes)
        self.train_embeddings = method == "full" if train_embeddings is None else bool(train_embeddings)
        self.eval_batch_size = int(eval_batch_size)
        self.token_multiple = int(token_multiple)
        self.flop_counter = flop_counter or StepFlopCounter(model)
        has_adapters = any(isinstance(m, LoRALinear) for m in model.modules())
        self.allocator_slack = ALLOCATOR_SLACK_ADAPTERS if has_adapters else ALLOCATOR_SLACK
        self.pixel_bytes = 3 * img_size * img_size * 4  # a preprocessed fp32 image

        def nbytes(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        self.weight_bytes = nbytes(model.parameters())
        self.block_bytes = [nbytes(b.parameters()) for b in model.blocks]
        # What trains in a trainable block (gradients, optimizer state): LoRA adapters only, where the model has
        # them; every parameter of the block otherwise (a block with nothing marked trainable counts whole).
        self.block_train_bytes = [nbytes(p for p, t in zip(b.parameters(), trainable_flags(b)) if t)
                                  for b in model.blocks]
        names = ("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")
        self.embed_bytes = nbytes(p for n, p in model.named_parameters() if n.startswith(names))
        self.tail_bytes = self.weight_bytes - sum(self.block_bytes) - self.embed_bytes  # norm(s) + head(s)
        head_names = ("head.", "head_dist.")
        self.head_bytes = nbytes(p for n, p in model.named_parameters() if n.startswith(head_names))

    # -- shapes -------------------------------------------------------------------------------------------------
    def shape(self, batch_size: int, keep_ratios: Sequence[float], trainable: Sequence[bool],
              recompute: Sequence[bool] | None = None) -> StepShape:
        """The step's tokens per block from its keep ratios (cumulative, as the mechanism drops them)."""
        tokens, n = [], self.tokens_in
        for r in keep_ratios:
            tokens.append(n)
            n = count_kept(n - self.prefix, r, self.token_multiple) + self.prefix
        return StepShape(int(batch_size), tuple(tokens), n, tuple(bool(t) for t in trainable),
                         tuple(bool(r) for r in (recompute or (False,) * self.depth)), tuple(keep_ratios))

    def _kinds(self, s: StepShape) -> list[str]:
        return block_kinds(s.trainable, train_below=self.train_embeddings)

    # -- memory -------------------------------------------------------------------------------------------------
    def activation_bytes(self, s: StepShape) -> list[float]:
        """Saved bytes of each block for the step (token-selection indices included)."""
        out = []
        for i, kind in enumerate(self._kinds(s)):
            b, n = s.batch_size, s.tokens[i]
            if kind == "fwd":
                out.append(0.0)
                continue
            a = b * n * self.cal.recompute_per_token if s.recompute[i] else self.cal.saved[kind](b, n)
            n_next = s.tokens[i + 1] if i + 1 < self.depth else s.tokens_out
            if n_next < n:
                a += b * (n_next - self.prefix) * self.cal.token_index_bytes
            out.append(a)
        return out

    def _norm_grads(self, s: StepShape) -> bool:
        return self.method != "head" or any(k != "fwd" for k in self._kinds(s))

    def tail_activation_bytes(self, s: StepShape) -> float:
        return self.cal.tail[self._norm_grads(s)](s.batch_size, s.tokens_out)

    def stem_activation_bytes(self, s: StepShape) -> float:
        return self.cal.stem(s.batch_size, 0) if self.train_embeddings else 0.0

    def step_activation_bytes(self, s: StepShape) -> float:
        """Everything the step saves for backward (what ``saved_tensors_hooks`` would count)."""
        return sum(self.activation_bytes(s)) + self.tail_activation_bytes(s) + self.stem_activation_bytes(s)

    def optimizer_bytes(self, lowest_trainable: int | None) -> int:
        """Optimizer state of every parameter that can ever train (blocks from ``lowest_trainable`` up)."""
        if self.method == "head":
            train = self.head_bytes
        else:
            blocks = 0 if lowest_trainable is None else sum(self.block_train_bytes[lowest_trainable:])
            train = blocks + self.tail_bytes + (self.embed_bytes if self.train_embeddings else 0)
        return OPTIMIZER_STATES * train

    def peak(self, s: StepShape, lowest_ever: int | None = None) -> dict[str, float]:
        """Predicted peak process bytes of a training step of shape ``s`` (steady state) and of evaluation.

        ``lowest_ever``: the lowest block that can ever train under the caps (its optimizer state exists).
        Returns a breakdown; ``"peak"`` is the prediction.
        """
        kinds = self._kinds(s)
        acts = self.activation_bytes(s)
        tail = self.tail_activation_bytes(s)
        stem = self.stem_activation_bytes(s)
        if lowest_ever is None:
            lowest_ever = 0 if self.method != "head" else None
        static = self.baseline_bytes + self.weight_bytes + self.optimizer_bytes(lowest_ever)
        batch = s.batch_size * self.pixel_bytes
        live = static + batch + sum(acts) + tail + stem
        tail_grads = self.head_bytes if self.method == "head" else self.tail_bytes
        # Forward, block by block: what earlier blocks saved plus this block's own intermediates (the larger of its
        # saved bytes and a no-grad forward's transient).
        fwd_peak, before = live, static + batch + stem
        for i in range(self.depth):
            fwd_peak = max(fwd_peak, before + max(acts[i], self.cal.forward(s.batch_size, s.tokens[i])))
            before += acts[i]
        # Backward, top block down: blocks above are freed and hold gradients; the one in backward adds its
        # transient (and, recomputed, its re-run activations).
        bwd_peak, grads, freed = live + tail_grads, tail_grads, tail
        for i in reversed(range(self.depth)):
            if kinds[i] == "fwd":
                continue
            own = self.block_train_bytes[i] if s.trainable[i] else 0
            rerun = self.cal.saved[kinds[i]](s.batch_size, s.tokens[i]) if s.recompute[i] else 0.0
            now = live - freed + grads + own + rerun + self.cal.backward(s.batch_size, s.tokens[i])
            bwd_peak = max(bwd_peak, now)
            grads += own
            freed += acts[i]
        if self.train_embeddings:
            grads += self.embed_bytes
        opt_peak = static + batch + grads
        eval_peak = (static + self.eval_batch_size * self.pixel_bytes
                     + self.cal.forward(self.eval_batch_size, self.tokens_in)
                     + self.eval_batch_size * self.tokens_in * self.cal.recompute_per_token)
        # After training the trainer saves the weights: a contiguous clone of every tensor, safetensors' bytes
        # of each and the joined file buffer.
        save_peak = static + SAVE_WEIGHT_COPIES * self.weight_bytes
        slack = self.allocator_slack * (sum(acts) + tail + stem)
        peak = max(fwd_peak, bwd_peak, opt_peak, eval_peak, save_peak) + slack
        return {"peak": peak, "static": static, "baseline": self.baseline_bytes, "weights": self.weight_bytes,
                "optimizer": self.optimizer_bytes(lowest_ever), "activations": sum(acts) + tail + stem,
                "forward": fwd_peak, "backward": bwd_peak, "optimizer_step": opt_peak, "eval": eval_peak,
                "save": save_peak, "allocator_slack": slack}

    # -- FLOPs --------------------------------------------------------------------------------------------------
    def flops(self, s: StepShape) -> int:
        """Forward+backward FLOPs of the step, re-run forwards of recomputed blocks included (StepFlopCounter)."""
        total = self.flop_counter.step_flops(s.batch_size, self.img_size, s.tokens, s.trainable,
                                             train_embeddings=self.train_embeddings,
                                             train_head=True, train_final_norm=self.method != "head",
                                             keep_ratios=s.keep_ratios, recompute=s.recompute)
        return int(total)

    # -- worst case under caps -------------------------------------------------------------------------------------
    def worst_shapes(self, caps: PolicyCaps, batch_size: int, k_trainable: int) -> list[StepShape]:
        """Step shapes a policy capped by ``caps`` can produce at its most expensive (memory and FLOPs).

        Budgets sit at their caps (all tokens without one) and the lowest trainable block is
        ``caps.lowest_trainable``. The other K-1 trainable blocks are placed three ways and the costlier is taken:
        on the non-recomputed blocks with the most tokens (most stored activations: a recomputed block keeps only
        its input whether it trains or not), on the lowest blocks (most FLOPs), on the top blocks (their gradients
        exist while everything below is still stored). ``full`` trains every block with every token; ``head`` none.
        """
        depth = self.depth
        recompute = tuple(caps.recompute) if caps.recompute is not None else (False,) * depth
        if self.method != "alast":
            keep = (1.0,) * depth
            trainable = (self.method == "full",) * depth
            return [self.shape(batch_size, keep, trainable, recompute)]
        keep = tuple(min(1.0, c) for c in caps.max_keep) if caps.max_keep is not None else (1.0,) * depth
        lo = max(0, caps.lowest_trainable)
        k = min(k_trainable, caps.max_trainable or depth, depth - lo)
        if k <= 0:
            return [self.shape(batch_size, keep, (False,) * depth, recompute)]
        tokens = self.shape(batch_size, keep, (False,) * depth).tokens
        rest = sorted(range(lo + 1, depth), key=lambda i: (recompute[i], -tokens[i], i))[:k - 1]
        placements = {
            tuple(i == lo or i in rest for i in range(depth)),  # most stored activations
            tuple(lo <= i < lo + k for i in range(depth)),  # most FLOPs
            tuple(i == lo or i >= depth - (k - 1) for i in range(depth)),  # gradients held longest in backward
        }
        return [self.shape(batch_size, keep, t, recompute) for t in sorted(placements)]

    def worst_peak(self, caps: PolicyCaps, batch_size: int, k_trainable: int) -> dict[str, float]:
        """Peak breakdown (see :meth:`peak`) of the most memory-hungry step under ``caps``."""
        lowest_ever = None if self.method == "head" else (0 if self.method == "full" else caps.lowest_trainable)
        shapes = self.worst_shapes(caps, batch_size, k_trainable)
        return max((self.peak(s, lowest_ever) for s in shapes), key=lambda d: d["peak"])

    def worst_flops(self, caps: PolicyCaps, batch_size: int, k_trainable: int) -> int:
        """FLOPs of the most expensive step under ``caps``."""
        return max(self.flops(s) for s in self.worst_shapes(caps, batch_size, k_trainable))


# ================================================================================================================
# Planner
# ================================================================================================================


@dataclass(frozen=True)
class RunPlan:
    """What the planner decided for a run.

    Attributes:
        caps: Caps to pass to ``policy.decide`` every step (recompute flags also apply to ``full``).
        batch_size: Images per step (the requested one unless it had to shrink).
        predicted_peak_bytes: Peak process memory of the most expensive step the capped policy can produce.
        memory_ceiling_bytes: The profile's ceiling (None without a profile).
        flop_ceiling_per_step: The profile's FLOP budget per step at the run's precision (None: no budget).
        predicted_flops_per_step: FLOPs of the most expensive step (recomputed forwards included).
        notes: What was capped and why, in words.
        breakdown: The predicted peak's parts (bytes), for the summary.
    """

    caps: PolicyCaps
    batch_size: int
    predicted_peak_bytes: int
    memory_ceiling_bytes: int | None
    flop_ceiling_per_step: float | None
    predicted_flops_per_step: int
    notes: list[str] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict, compare=False)


def _mib(n: float) -> str:
    return f"{int(n)} bytes ({n / 2**20:.1f} MiB)"


def _blocks(flags: Sequence[bool]) -> str:
    idx = [i for i, f in enumerate(flags) if f]
    return ", ".join(map(str, idx)) if idx else "none"


def plan_run(model: nn.Module, profile=None, *, img_size: int, batch_size: int, precision: str = "fp32",
             method: str = "alast", alast_config: AlastConfig | None = None, device: str = "cpu",
             lowest_trainable: int = 0, recompute: Sequence[bool] | None = None,
             train_embeddings: bool | None = None, eval_batch_size: int = 64, token_multiple: int = 1,
             flop_counter: StepFlopCounter | None = None, baseline_bytes: int | None = None,
             calibration: Calibration | None = None, memory_ceiling_bytes: int | None = None,
             flop_ceiling_per_step: float | None = None) -> RunPlan:
    """Caps that keep the most expensive step a policy can take under the profile's memory and FLOP ceilings.

    Call after the model is built and its weights loaded, before optimizer state exists: the process baseline is
    the RSS now less the weights. Search order, cheapest accuracy cost first (the first setting that fits wins):

    1. recompute the activations of eligible blocks, lowest (most tokens) first -- costs time, not accuracy;
    2. raise the lowest trainable block (K shrinks only when fewer blocks than K remain) -- low blocks hold generic
       features and the most tokens;
    3. cap every block's keep ratio (``KEEP_LEVELS``) -- fewer tokens per step;
    4. a smaller batch, down to 1 -- changes the optimisation itself, so last.

    ``full`` and ``head`` can only recompute and shrink the batch (``full`` keeps every block and token).
    ``lowest_trainable`` and ``recompute`` are the run's own settings; the planner only tightens them.

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
    cal = calibration or calibrate(model, img_size=img_size, precision=precision, device=device)
    cost = CostModel(model, cal, img_size=img_size, method=method, baseline_bytes=baseline_bytes,
                     train_embeddings=train_embeddings, eval_batch_size=eval_batch_size,
                     token_multiple=token_multiple, flop_counter=flop_counter)
    config = alast_config or AlastConfig()
    k0 = config.k_trainable or math.ceil(0.75 * depth)
    base_recompute = tuple(bool(r) for r in recompute) if recompute else (False,) * depth
    lo0 = min(max(0, lowest_trainable), depth - 1)

    if method == "alast":
        keep_levels, lows = KEEP_LEVELS, range(lo0, depth)
    else:
        keep_levels, lows = (1.0,), (0 if method == "full" else lo0,)

    def candidates():
        for batch in range(batch_size, 0, -1):
            for keep in keep_levels:
                for lo in lows:
                    eligible = [i for i in range(lo, depth) if not base_recompute[i]] if method != "head" else []
                    for r in range(len(eligible) + 1):
                        flags = tuple(base_recompute[i] or i in eligible[:r] for i in range(depth))
                        yield batch, PolicyCaps(
                            max_keep=None if keep >= 1.0 else (keep,) * depth,
                            max_trainable=min(k0, depth - lo) if method == "alast" else None,
                            lowest_trainable=lo, recompute=flags)

    last = None
    for batch, caps in candidates():
        breakdown = cost.worst_peak(caps, batch, k0)
        last = (batch, caps, breakdown)
        if mem_ceiling is not None and math.ceil(breakdown["peak"]) > mem_ceiling:
            continue
        flops = cost.worst_flops(caps, batch, k0)
        if flop_ceiling is not None and flops > flop_ceiling:
            continue
        notes = _plan_notes(method, batch_size, batch, caps, lo0, k0, base_recompute, depth)
        return RunPlan(caps=caps, batch_size=batch, predicted_peak_bytes=math.ceil(breakdown["peak"]),
                       memory_ceiling_bytes=mem_ceiling, flop_ceiling_per_step=flop_ceiling,
                       predicted_flops_per_step=int(flops), notes=notes, breakdown=breakdown)
    raise _nothing_fits(cost, model, last, mem_ceiling, flop_ceiling, k0, img_size)


def _plan_notes(method: str, asked_batch: int, batch: int, caps: PolicyCaps, lo0: int, k0: int,
                base_recompute: Sequence[bool], depth: int) -> list[str]:
    notes = []
    added = [i for i, (r, b) in enumerate(zip(caps.recompute or (False,) * depth, base_recompute)) if r and not b]
    if added:
        notes.append(f"recompute blocks {', '.join(map(str, added))} in backward (activations not stored)")
    if method == "alast" and caps.lowest_trainable > lo0:
        notes.append(f"lowest trainable block raised {lo0} -> {caps.lowest_trainable}")
    if method == "alast" and caps.max_trainable is not None and caps.max_trainable < k0:
        notes.append(f"trainable blocks per step K {k0} -> {caps.max_trainable}")
    if caps.max_keep is not None:
        notes.append(f"keep ratio capped at {max(caps.max_keep):g} in every block")
    if batch < asked_batch:
        notes.append(f"batch size {asked_batch} -> {batch}")
    return notes or ["fits without caps"]


def _nothing_fits(cost: CostModel, model: nn.Module, last, mem_ceiling, flop_ceiling, k0: int,
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
        if breakdown["baseline"] >= mem_ceiling:
            hints.append(f"the process alone (interpreter and libraries) takes {_mib(breakdown['baseline'])}")
        else:
            hints.append(f"a model of at most {params_fit / 1e6:.1f} M parameters "
                         f"(this one has {cost.weight_bytes / 4e6:.1f} M)")
            patch = model.patch_embed.patch_size
            patch = patch if isinstance(patch, int) else patch[0]
            for size in range(img_size - patch, patch - 1, -patch):
                c = _resized(cost, size, patch)
                if c.worst_peak(caps, 1, k0)["peak"] <= mem_ceiling:
                    hints.append(f"--img-size {size} at batch 1")
                    break
        return ConfigError(
            f"memory: the smallest plan (batch 1, every cap applied) needs {_mib(need)}, the profile's ceiling is "
            f"{_mib(mem_ceiling)} (weights {_mib(breakdown['weights'])}, process {_mib(breakdown['baseline'])}); "
            f"would fit: {'; '.join(hints)}")
    flops = cost.worst_flops(caps, batch, k0)
    return ConfigError(
        f"FLOPs: the smallest plan (batch 1, every cap applied) needs {flops:.3e} FLOPs per step, the profile's "
        f"ceiling is {flop_ceiling:.3e}; would fit: a profile with target_step_seconds >= "
        f"{flops / flop_ceiling * 1.0:.2f} x its current value, or a smaller --img-size or model")


def _resized(cost: CostModel, img_size: int, patch: int) -> CostModel:
    """A copy of ``cost`` at another image size (same calibration: its coefficients are per token and image)."""
    other = copy.copy(cost)
    other.img_size = img_size
    other.tokens_in = (img_size // patch) ** 2 + cost.prefix
    other.pixel_bytes = 3 * img_size * img_size * 4
    return other


# ================================================================================================================
# Runtime guard
# ================================================================================================================


class MemoryGuard:
    """Tightens the caps when the measured RSS comes near the ceiling, for the steps that follow.

    Pure logic: the trainer passes a reading (use the kernel's high-water mark, ``peak_rss_bytes()``, so a peak
    inside a step is seen) and the caps in force; above ``threshold * ceiling`` the guard returns tighter caps and
    an event for ``metrics.jsonl``. It tightens once per new high reading, so a high-water mark that stays put does
    not tighten again. Order: recompute one more block (lowest eligible first), then lower every block's keep cap
    by ``keep_step`` (not below ``min_keep``; ``alast`` only), then raise the lowest trainable block (``alast``
    only). ``full`` keeps every token and block; ``head`` has nothing to tighten.
    """

    def __init__(self, ceiling_bytes: int, depth: int, *, method: str = "alast", threshold: float = GUARD_THRESHOLD,
                 keep_step: float = 0.1, min_keep: float = 0.25):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.ceiling_bytes = int(ceiling_bytes)
        self.depth = depth
        self.method = method
        self.threshold = threshold
        self.keep_step = keep_step
        self.min_keep = min_keep
        self.last_trigger = 0

    @property
    def limit_bytes(self) -> int:
        return int(self.threshold * self.ceiling_bytes)

    def check(self, rss_bytes: int, caps: PolicyCaps) -> tuple[PolicyCaps, dict | None]:
        """(caps for the next steps, event or None)."""
        if rss_bytes < self.limit_bytes or rss_bytes <= self.last_trigger:
            return caps, None
        self.last_trigger = int(rss_bytes)
        new, action = self._tighten(caps)
        event = {"event": "memory_guard", "rss_bytes": int(rss_bytes), "limit_bytes": self.limit_bytes,
                 "ceiling_bytes": self.ceiling_bytes, "action": action,
                 "recompute": [i for i, r in enumerate(new.recompute or ()) if r],
                 "max_keep": None if new.max_keep is None else max(new.max_keep),
                 "lowest_trainable": new.lowest_trainable}
        return new, event

    def _tighten(self, caps: PolicyCaps) -> tuple[PolicyCaps, str]:
        if self.method == "head":
            return caps, "none (head-only trains no block)"
        lo = 0 if self.method == "full" else caps.lowest_trainable
        flags = list(caps.recompute or (False,) * self.depth)
        todo = [i for i in range(lo, self.depth) if not flags[i]]
        if todo:
            flags[todo[0]] = True
            return replace(caps, recompute=tuple(flags)), f"recompute block {todo[0]}"
        if self.method != "alast":
            return caps, "none left (every block recomputed)"
        current = max(caps.max_keep) if caps.max_keep is not None else 1.0
        if current > self.min_keep:
            keep = max(self.min_keep, round(current - self.keep_step, 6))
            return replace(caps, max_keep=(keep,) * self.depth), f"keep ratio cap {current:g} -> {keep:g}"
        if caps.lowest_trainable < self.depth - 1:
            top = caps.lowest_trainable + 1
            k = caps.max_trainable
            k = min(k, self.depth - top) if k is not None else None
            return (replace(caps, lowest_trainable=top, max_trainable=k),
                    f"lowest trainable block {caps.lowest_trainable} -> {top}")
        return caps, "none left"

    def state_dict(self) -> dict:
        return {"last_trigger": self.last_trigger}

    def load_state_dict(self, state: dict) -> None:
        self.last_trigger = int(state["last_trigger"])
