"""The cost model of a training step: predicted peak process memory and FLOPs for a step's shape, from a
:class:`~edge_alast.device.calibration.Calibration` and the one FLOP model (:class:`~edge_alast.model.flops.StepFlopCounter`).
The planner, the memory guard, the run summary and ``tools/bench_planner.py`` all use it.

Memory model (bytes of the training process at its peak)::

    peak = baseline                          RSS at plan time less the model's weights (interpreter, torch, timm,
                                             data pipeline), measured with psutil
         + weights                           every parameter (fp32)
         + optimizer state                   AdamW/Adam: 2 states per parameter that can ever train under the caps
         + max over the step's phases of     (see ``CostModel.peak``; ``train_peak``: the training steps alone)
             saved activations               per block kind, calibrated (:mod:`edge_alast.device.calibration`)
             + gradients of the blocks already through backward
             + the backward transient of the block in backward (and, recomputed, its re-run activations)
           and of evaluation (no-grad forward at the eval batch) and of saving the weights (one more copy),
           and of the ONNX export after the training state is freed (``EXPORT_WEIGHT_COPIES``)
         + allocator slack                   ``ALLOCATOR_SLACK[allocator in use]`` x the saved activations (see
                                             its comment; another value for models with LoRA adapters)

FLOPs come from :class:`edge_alast.model.flops.StepFlopCounter`, re-run forwards of recomputed blocks included.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .allocator import allocator_in_use
from .calibration import Calibration, full_tokens
from ..model.flops import StepFlopCounter, block_kinds
from ..adapters.lora import LoRALinear
from ..alast.policy import StepPlan, tokens_per_block
from ..model.names import is_embedding, is_head
from ..model.trainable import TrainableSet

__all__ = ["CostModel", "StepShape"]

OPTIMIZER_STATES = 2  # AdamW/Adam: exp_avg and exp_avg_sq, each the parameter's size and dtype
# Peak RSS above the live tensor bytes, as a share of the step's saved activations, per allocator (the one this
# process runs on, allocator.allocator_in_use()): (plain model, model with LoRA adapters). Measured, not derived:
# slack = (measured training peak - predicted live bytes) / predicted saved activations, ViT-S/14 fp32 at 224 px,
# batch 16, 20 steps, one run per method and allocator (tools/bench_allocators.py; docs/memory.md "Allocators"); each value
# is the largest of its methods rounded up to the next 0.05.
# - glibc: inside a step it cannot hand back the heap that the forward's freed intermediates fragment between saved
#   tensors (malloc_trim runs only after the step): full 0.43, alast 0.29; with adapters each one's small saved
#   [B, N, r] tensor (A x) pins heap between the large transients: lora 0.93, light-peft 0.97 (earlier runs: 0.98,
#   1.08; 1.15 keeps the margin over those).
# - glibc-tuned (allocator.tune_glibc: 4 MiB mmap threshold): full 0.03, alast 0.14, lora 0.03, light-peft 0.03.
# - jemalloc: full 0.04, alast 0.16, lora 0.07, light-peft 0.08; tcmalloc: full 0.07, alast 0.18, lora 0.12,
#   light-peft 0.10. Without glibc's heap the adapters cost nothing extra: one value covers both (ALaST's changing
#   shapes set it).
ALLOCATOR_SLACK = {"glibc": (0.45, 1.15), "glibc-tuned": (0.15, 0.15), "jemalloc": (0.20, 0.20),
                   "tcmalloc": (0.20, 0.20)}


def allocator_slack(adapters: bool, allocator: str | None = None) -> float:
    """The slack for ``allocator`` (default: this process's); an unknown one gets glibc's, the largest."""
    plain, with_adapters = ALLOCATOR_SLACK.get(allocator or allocator_in_use(), ALLOCATOR_SLACK["glibc"])
    return with_adapters if adapters else plain


# save_model: safetensors.torch.save_model turns each tensor into a bytes object before writing, so the weights
# exist once more while the file is written (was 3 copies with a clone and an in-memory file; head-only runs,
# where saving sets the peak, measured 515 MiB vs 514 predicted with 1).
SAVE_WEIGHT_COPIES = 1
# The end-of-run ONNX export (export.export_run, after the trainer has freed its state and trimmed the heap): the
# run's model reloaded, the exporter's trace of the graph alone (the weights are streamed into the file one tensor
# at a time, export.write_onnx) and the state the TorchScript exporter keeps after its first use, then -- the
# PyTorch weights freed -- the onnxruntime session of the parity check with its prepacked weights, plus that
# check's activations at the run's evaluation batch in PyTorch and in onnxruntime (2 x an evaluation forward).
# Measured on the shared ViT-S/14 at 224 px, batch 16, in the training process (alast, tcmalloc): 854 MiB over a
# 367 MiB baseline with 66 MiB of evaluation activations, i.e. 4.3 x the weights plus the activations (it was
# 6.9 x when the exporter serialised the whole model in memory and the PyTorch weights stayed alive during the
# check, 11.2 x before the trace ran under no_grad).
EXPORT_WEIGHT_COPIES = 4.3


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
        calibration: From :func:`~edge_alast.device.calibration.calibrate` for this model and precision.
        img_size: Input side in pixels.
        trainable: What can ever train (gradients and optimizer state are costed for these only).
        baseline_bytes: Process bytes that are not the model: RSS at plan time less the weights.
        eval_batch_size: Images per evaluation batch.
        token_multiple: As for :func:`edge_alast.alast.policy.count_kept`.
        flop_counter: A :class:`StepFlopCounter` for the model (made when not given).
    """

    def __init__(self, model: nn.Module, calibration: Calibration, *, img_size: int, trainable: TrainableSet,
                 baseline_bytes: int, eval_batch_size: int = 64, token_multiple: int = 1,
                 flop_counter: StepFlopCounter | None = None, export: bool = False):
        self.cal = calibration
        self.img_size = img_size
        self.trainable = trainable
        self.depth = len(model.blocks)
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.tokens_in = full_tokens(model, img_size)
        self.baseline_bytes = int(baseline_bytes)
        self.train_embeddings = trainable.embeddings
        self.eval_batch_size = int(eval_batch_size)
        self.token_multiple = int(token_multiple)
        self.flop_counter = flop_counter or StepFlopCounter(model, trainable)
        self.export = export
        has_adapters = any(isinstance(m, LoRALinear) for m in model.modules())
        self.allocator_slack = allocator_slack(has_adapters)
        self.pixel_bytes = 3 * img_size * img_size * 4  # a preprocessed fp32 image

        def nbytes(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        named = list(model.named_parameters())
        outside = [(n, p) for n, p in named if not n.startswith("blocks.")]
        self.weight_bytes = nbytes(p for _, p in named)
        self.block_bytes = [nbytes(b.parameters()) for b in model.blocks]
        # What trains in a trainable block (gradients, optimizer state): its LoRA adapters where the model has them,
        # every parameter otherwise.
        self.block_train_bytes = [nbytes(p for p, t in zip(b.parameters(), trainable.block_flags(model, i)) if t)
                                  for i, b in enumerate(model.blocks)]
        self.embed_bytes = nbytes(p for n, p in outside if is_embedding(n))
        self.tail_bytes = nbytes(p for n, p in outside if not is_embedding(n))  # norm(s) + head(s)
        self.head_bytes = nbytes(p for n, p in outside if is_head(n))
        # Outside the blocks, what trains: gradients of the norm and head exist from the first backward op on.
        self.tail_train_bytes = nbytes(p for n, p in outside if not is_embedding(n) and n in trainable.names)
        self.embed_train_bytes = self.embed_bytes if trainable.embeddings else 0
        self.blocks_train = any(n.startswith("blocks.") for n in trainable.names)

    def resized(self, img_size: int) -> "CostModel":
        """A copy at another image size (same calibration: its coefficients are per token and image)."""
        patch = self.flop_counter.patch_size
        other = copy.copy(self)
        other.img_size = img_size
        other.tokens_in = (img_size // patch[0]) * (img_size // patch[1]) + self.prefix
        other.pixel_bytes = 3 * img_size * img_size * 4
        return other

    # -- shapes -------------------------------------------------------------------------------------------------
    def shape(self, batch_size: int, keep_ratios: Sequence[float], trainable: Sequence[bool],
              recompute: Sequence[bool] | None = None) -> StepShape:
        """The step's tokens per block from its keep ratios (cumulative, as the mechanism drops them)."""
        *tokens, n = tokens_per_block(self.tokens_in, self.prefix, keep_ratios, self.token_multiple)
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
        return self.trainable.final_norm or any(k != "fwd" for k in self._kinds(s))

    def tail_activation_bytes(self, s: StepShape) -> float:
        return self.cal.tail[self._norm_grads(s)](s.batch_size, s.tokens_out)

    def stem_activation_bytes(self, s: StepShape) -> float:
        return self.cal.stem(s.batch_size, 0) if self.train_embeddings else 0.0

    def step_activation_bytes(self, s: StepShape) -> float:
        """Everything the step saves for backward (what ``saved_tensors_hooks`` would count)."""
        return sum(self.activation_bytes(s)) + self.tail_activation_bytes(s) + self.stem_activation_bytes(s)

    def optimizer_bytes(self, lowest_trainable: int | None) -> int:
        """Optimizer state of every parameter that can ever train (blocks from ``lowest_trainable`` up)."""
        blocks = 0 if lowest_trainable is None else sum(self.block_train_bytes[lowest_trainable:])
        return OPTIMIZER_STATES * (blocks + self.tail_train_bytes + self.embed_train_bytes)

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
            lowest_ever = 0 if self.blocks_train else None
        static = self.baseline_bytes + self.weight_bytes + self.optimizer_bytes(lowest_ever)
        batch = s.batch_size * self.pixel_bytes
        live = static + batch + sum(acts) + tail + stem
        tail_grads = self.tail_train_bytes
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
        grads += self.embed_train_bytes
        opt_peak = static + batch + grads
        eval_peak = (static + self.eval_batch_size * self.pixel_bytes
                     + self.cal.forward(self.eval_batch_size, self.tokens_in)
                     + self.eval_batch_size * self.tokens_in * self.cal.recompute_per_token)
        # After training the trainer saves the weights: a contiguous clone of every tensor, safetensors' bytes
        # of each and the joined file buffer.
        save_peak = static + SAVE_WEIGHT_COPIES * self.weight_bytes
        slack = self.allocator_slack * (sum(acts) + tail + stem)
        train_peak = max(fwd_peak, bwd_peak, opt_peak) + slack
        peak = max(train_peak, max(eval_peak, save_peak) + slack)
        # The export runs once the training state is freed: the process baseline, no optimizer state.
        eval_acts = eval_peak - static - self.eval_batch_size * self.pixel_bytes
        export_peak = (self.baseline_bytes + EXPORT_WEIGHT_COPIES * self.weight_bytes + 2 * eval_acts
                       if self.export else 0.0)
        peak = max(peak, export_peak)
        return {"peak": peak, "train_peak": train_peak, "export": export_peak, "static": static,
                "baseline": self.baseline_bytes, "weights": self.weight_bytes,
                "optimizer": self.optimizer_bytes(lowest_ever), "activations": sum(acts) + tail + stem,
                "forward": fwd_peak, "backward": bwd_peak, "optimizer_step": opt_peak, "eval": eval_peak,
                "save": save_peak, "allocator_slack": slack}

    # -- FLOPs --------------------------------------------------------------------------------------------------
    def flops(self, s: StepShape) -> int:
        """Forward+backward FLOPs of the step, re-run forwards of recomputed blocks included (StepFlopCounter)."""
        total = self.flop_counter.step_flops(s.batch_size, self.img_size, s.tokens, s.trainable,
                                             train_embeddings=self.train_embeddings,
                                             train_head=True, train_final_norm=self.trainable.final_norm,
                                             keep_ratios=s.keep_ratios, recompute=s.recompute)
        return int(total)

    # -- worst case -------------------------------------------------------------------------------------------
    def _shapes(self, plans: Sequence[StepPlan], batch_size: int) -> list[StepShape]:
        return [self.shape(batch_size, p.keep_ratios, p.trainable, p.recompute) for p in plans]

    def worst_peak(self, plans: Sequence[StepPlan], batch_size: int) -> dict[str, float]:
        """Peak breakdown (see :meth:`peak`) of the most memory-hungry of ``plans`` (a policy's
        ``worst_plans(caps)``), with optimizer state for every block that any of them trains."""
        lowest_ever = min((p.lowest_trainable for p in plans if p.lowest_trainable is not None), default=None)
        return max((self.peak(s, lowest_ever) for s in self._shapes(plans, batch_size)), key=lambda d: d["peak"])

    def worst_flops(self, plans: Sequence[StepPlan], batch_size: int) -> int:
        """FLOPs of the most expensive of ``plans``."""
        return max(self.flops(s) for s in self._shapes(plans, batch_size))
