"""Measuring a model's memory: saved-for-backward bytes, live tensor bytes, and the per-model calibration the
cost model (:mod:`edge_alast.device.costmodel`) is built on.

Calibration (once per run, by measurement, on a copy of one block at batch 2 and 4): under
``torch.autograd.graph.saved_tensors_hooks`` the unique storages (by data pointer) a block saves for backward are
counted for each backward kind of :mod:`edge_alast.model.flops` (``weight``: the lowest trainable block; ``both``: a
trainable block above it; ``input``: a frozen block above a trainable one); a recomputed block saves only its input;
a ``fwd`` block (below the lowest trainable) saves nothing. Saved bytes are fitted as ``a*B*N + p*B + c`` from
three runs ((B, N) = (2, N), (2, N/2), (4, N)); ``c`` holds the bf16 weight copies autocast keeps for backward.
Backward and evaluation transients are the peak of live tensor bytes (a dispatch mode that follows every tensor an
op returns until it is freed) above what was live before, fitted the same way.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .precision import autocast
from ..model.trainable import TrainableSet

__all__ = ["BlockCoefficients", "Calibration", "calibrate", "full_tokens", "saved_tensor_bytes"]

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


def _block_measure(block: nn.Module, train: Sequence[bool], batch: int, tokens: int, dim: int, kind: str,
                   device: str, precision: str) -> tuple[int, int, int]:
    """(saved bytes, backward transient, no-grad forward transient) of one block at (batch, tokens); ``train``:
    per parameter, whether a weight-gradient kind trains it."""
    params = list(block.parameters())
    exclude = {p.untyped_storage().data_ptr() for p in params}
    need_weight = kind in ("weight", "both")
    need_input = kind in ("input", "both")
    flags = [p.requires_grad for p in params]
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
        with counter.hooks(), autocast(device, precision):
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
        with autocast(device, precision):
            out = block(xi)
        forward = max(0, live.peak - before)
        del out, xi
    return saved, backward, forward


def calibrate(model: nn.Module, *, img_size: int, precision: str = "fp32", device: str = "cpu",
              trainable: TrainableSet | None = None) -> Calibration:
    """Measure the memory coefficients of ``model`` (a timm ViT) at ``precision`` on ``device``.

    ``trainable`` says what trains in a block that trains (its adapters for LoRA; all of it otherwise; default:
    what is marked ``requires_grad`` now). A method whose blocks never train is calibrated as if they trained whole:
    its plans never use those coefficients. Runs a copy of block 0 (and the model's own norm/head/patch embedding, gradients restored afterwards) at batch
    2 and 4 (norm/head at 1 and 2) for the model's full token count and half of it: a few hundred ms for ViT-S on a CPU.
    """
    blocks = getattr(model, "blocks", None)
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no `blocks`: the planner needs a timm ViT-style model")
    block = copy.deepcopy(blocks[0]).to(device).train()
    train = (trainable or TrainableSet.from_flags(model)).block_flags(model, 0)
    train = train if any(train) else [True] * len(train)
    dim = block.norm1.normalized_shape[0]
    n1 = full_tokens(model, img_size)
    n2 = max(getattr(model, "num_prefix_tokens", 1) + 1, n1 // 2)
    saved, backward, forward = {}, None, None
    b = CALIBRATION_BATCH
    for kind in ("weight", "both", "input"):
        m11 = _block_measure(block, train, b, n1, dim, kind, device, precision)
        m12 = _block_measure(block, train, b, n2, dim, kind, device, precision)
        m21 = _block_measure(block, train, 2 * b, n1, dim, kind, device, precision)
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
                    with autocast(device, precision):
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
                with autocast(device, precision):
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

