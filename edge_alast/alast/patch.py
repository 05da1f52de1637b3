"""ALaST mechanism: acts on a timm Vision Transformer according to a :class:`~edge_alast.alast.policy.StepPlan`.

``handle = apply_patch(model, trainable=record)`` hooks every block; ``handle.set_plan(plan)`` freezes/unfreezes
blocks (the parameters of the run's :class:`~edge_alast.model.trainable.TrainableSet`: all of a block, or its LoRA adapters) and sets their
token budgets; ``handle.remove()`` restores the model. Nothing of timm's Block/Attention forward is copied: a
forward hook on each block's ``attn.qkv`` takes the class-token attention row from q_cls and K (one query row,
O(N*D)) while the block keeps its own fused attention, LayerScale, qk-norm, drop-path; a forward hook on the
block measures the class-token change and replaces the block's output with the kept tokens. A plan with
:class:`~edge_alast.alast.policy.LiveBudgets` (the co-authors' arithmetic) has each block's keep ratio computed in
that hook from the delta just measured; :meth:`AlastHandle.applied_plan` reports the ratios used. Activation
recomputation wraps the block's own ``forward`` in ``torch.utils.checkpoint`` (non-reentrant).

Everything is active only while the model is in training mode and a plan is set: evaluation and export see the
unpatched computation with all tokens. ``eval_view=True`` keeps token dropping on in eval mode too, to measure a
trained model on the token view it was trained on (``edge-alast eval --train-view``).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.flops import stores_activations
from ..adapters.lora import LoRALinear
from .policy import StepPlan, count_kept
from .tokens import cls_attention, select_tokens
from ..model.trainable import TrainableSet


class AlastHandle:
    """Hooks on a timm ViT that carry out step plans. Made by :func:`apply_patch`."""

    def __init__(self, model: nn.Module, token_multiple: int = 1, trainable: TrainableSet | None = None,
                 eval_view: bool = False):
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise TypeError(f"{type(model).__name__} has no `blocks`: ALaST needs a timm VisionTransformer-style model")
        self.model = model
        self.blocks = list(blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.token_multiple = int(token_multiple)
        self.eval_view = eval_view
        self.plan: StepPlan | None = None
        self.deltas: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.delta_sums: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.applied: list[float] = [1.0] * len(self.blocks)  # the keep ratio each block used in the last forward
        self.streams: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.tokens_in: list[int] = [0] * len(self.blocks)
        self._scores: list[torch.Tensor | None] = [None] * len(self.blocks)
        # What a block that trains trains (all of it, or its LoRA adapters): from the run's record, never from flags
        # the plan itself toggles.
        self.trainable = trainable or TrainableSet.from_flags(model)
        self._block_params = [list(zip(blk.parameters(), self.trainable.block_flags(model, i)))
                              for i, blk in enumerate(self.blocks)]
        self._forwards: dict[int, object] = {}
        self._hooks = []
        self._unscored: set[int] = set()  # blocks without a fused attn.qkv: they train but cannot drop tokens
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if isinstance(getattr(attn, "qkv", None), (nn.Linear, LoRALinear)) and hasattr(attn, "num_heads"):
                self._hooks.append(attn.qkv.register_forward_hook(partial(self._qkv_hook, i)))
            else:
                self._unscored.add(i)
            self._hooks.append(blk.register_forward_hook(partial(self._on_block, i)))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _active(self) -> bool:
        return self.plan is not None and (self.model.training or self.eval_view)

    # -- hooks --------------------------------------------------------------------------------------------------
    def _qkv_hook(self, i: int, module: nn.Module, args, out: torch.Tensor) -> None:
        # Calls the instance's ``_on_qkv``: :meth:`eager_hooks` replaces it by a compiler-disabled one, so that a
        # compiled block (``--compile``) runs this hook in eager Python and never guards on the plan.
        self._on_qkv(i, module, args, out)

    def eager_hooks(self) -> None:
        """Keep the hook inside each block's ``forward`` (on ``attn.qkv``) out of ``torch.compile``'s graphs: it
        reads the plan, whose keep ratios would otherwise become guards that recompile the block every step."""
        self._on_qkv = torch.compiler.disable(type(self)._on_qkv.__get__(self))

    def _on_qkv(self, i: int, module: nn.Module, args, out: torch.Tensor) -> None:
        if not self._active() or (self.plan.keep_ratios[i] >= 1.0 and self.plan.live is None):
            return
        attn = self.blocks[i].attn
        with torch.no_grad():
            self._scores[i] = cls_attention(out.detach(), attn.num_heads, attn.scale, attn.q_norm, attn.k_norm)

    def _on_block(self, i: int, module: nn.Module, args, out: torch.Tensor):
        if not self._active():
            return None
        x_in = args[0]
        with torch.no_grad():
            # ALaST importance: squared L2 norm of the class token's change, batch mean (see AlastPolicy), and the
            # squared norm of the class token entering the block, for the scale-free relative importance.
            cls_in = x_in[:, 0].float()
            change = (out[:, 0].float() - cls_in).pow(2).sum(-1)
            self.delta_sums[i], self.deltas[i] = change.sum(), change.mean()
            self.streams[i] = cls_in.pow(2).sum(-1).mean()
        self.tokens_in[i] = int(x_in.shape[1])
        ratio, live = self.plan.keep_ratios[i], self.plan.live
        if live is not None:  # the budget moves with this forward's delta before the tokens are kept (co-authors)
            ratio = live.keep_ratio(i, float(self.delta_sums[i] if live.batch_sum else self.deltas[i]))
        self.applied[i] = ratio
        if ratio >= 1.0:
            self._scores[i] = None
            return None
        scores, self._scores[i] = self._scores[i], None
        n_patch = out.shape[1] - self.num_prefix_tokens
        prefix = self.num_prefix_tokens if self.plan.count_prefix else 0
        keep = count_kept(n_patch, ratio, self.token_multiple, prefix)
        return select_tokens(out, scores, keep, self.num_prefix_tokens)

    # -- plans --------------------------------------------------------------------------------------------------
    def set_plan(self, plan: StepPlan | None) -> None:
        """Apply a step plan: freeze/unfreeze blocks, set recomputation; ``None`` disables token dropping."""
        if plan is not None and plan.depth != self.depth:
            raise ValueError(f"plan has {plan.depth} blocks, model has {self.depth}")
        if plan is not None and self._unscored and (plan.live is not None
                                                    or any(plan.keep_ratios[i] < 1.0 for i in self._unscored)):
            raise ValueError(f"blocks {sorted(self._unscored)} have no fused attn.qkv and cannot drop tokens "
                             "(edge_alast.alast.support.check_model says why)")
        self.plan = plan
        if plan is None:
            return
        stores = stores_activations(plan.trainable, train_below=self.trainable.embeddings)
        for i, params in enumerate(self._block_params):
            train = plan.trainable[i]
            for p, can_train in params:
                # Only what can ever train: a LoRA block's frozen base stays frozen and its adapters follow the plan.
                p.requires_grad_(train and can_train)
                if not train:
                    p.grad = None  # frozen this step: no grad, so the optimizer skips it (its state is kept)
            self._set_recompute(i, plan.recompute[i] and stores[i])
        self.deltas = [None] * self.depth
        self.delta_sums = [None] * self.depth
        self.streams = [None] * self.depth
        self.applied = list(plan.keep_ratios)

    def _set_recompute(self, i: int, on: bool) -> None:
        blk = self.blocks[i]
        if on and i not in self._forwards:
            self._forwards[i] = vars(blk).get("forward")  # an instance attribute of its own, if it had one
            blk.forward = partial(_checkpointed, blk.forward)
        elif not on and i in self._forwards:
            own = self._forwards.pop(i)
            if own is None:
                del blk.forward  # the class's forward again
            else:
                blk.forward = own

    def step_deltas(self, reduction: str = "mean") -> list[float]:
        """This step's per-block importances, as floats: the batch mean, or with ``reduction="sum"`` the batch sum
        (the co-authors' measure)."""
        deltas = self.delta_sums if reduction == "sum" else self.deltas
        if any(d is None for d in deltas):
            raise RuntimeError("no importance measured for some blocks: run a training forward after set_plan")
        return [float(d) for d in deltas]

    def applied_plan(self) -> StepPlan | None:
        """The plan as the last forward carried it out: with live budgets, the keep ratios the blocks used."""
        if self.plan is None or self.plan.live is None:
            return self.plan
        return replace(self.plan, keep_ratios=tuple(self.applied))

    def step_streams(self) -> list[float]:
        """This step's per-block squared norm of the class token entering the block (batch mean), as floats."""
        if any(s is None for s in self.streams):
            raise RuntimeError("no class-token norm measured for some blocks: run a training forward after set_plan")
        return [float(s) for s in self.streams]

    def remove(self) -> None:
        """Remove hooks and wrappers and restore every parameter's ``requires_grad``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in list(self._forwards):
            self._set_recompute(i, False)
        for params in self._block_params:
            for p, can_train in params:
                p.requires_grad_(can_train)
        self.plan = None


def _checkpointed(forward, x, *args, **kwargs):
    return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)


def apply_patch(model: nn.Module, token_multiple: int = 1, trainable: TrainableSet | None = None,
                eval_view: bool = False) -> AlastHandle:
    """Hook a timm ViT for ALaST. Returns the handle that applies plans and removes the patch.

    ``trainable``: what can ever train (the run's record); default: what is marked ``requires_grad`` now.
    ``eval_view``: drop tokens by the plan in eval mode too (evaluating on the training-time token view).
    """
    return AlastHandle(model, token_multiple=token_multiple, trainable=trainable, eval_view=eval_view)
