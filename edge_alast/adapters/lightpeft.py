"""Light-PEFT (arXiv 2406.03792) for timm ViTs: early estimation with masks, then structural pruning.

Stage 1 (estimation) trains LoRA adapters plus learnable scalar masks, initialised to 1: one per attention head,
on that head's slice of the attention output (the input of ``attn.proj``), and one per FFN hidden unit, after the
activation (the input of ``mlp.fc2``). Both masks are :class:`InputMask` wrappers around timm's own Linears. An L1
penalty ``mask_l1 * sum|m|`` joins the loss. :class:`ImportanceRecorder` averages, over the second half of the
estimation steps, each adapter's importance ``||dW x|| / ||W x||`` (measured by forward hooks it registers on the
adapters: :class:`~edge_alast.adapters.lora.LoRALinear` knows nothing of Light-PEFT) and each rank's first-order
importance ``|mean(A_r * dA_r)| + |mean(B_r * dB_r)|``.

Stage 2 (:func:`plan_pruning`, :func:`apply_pruning`): per block, the ``head_prune_ratio`` share of heads with the
smallest |mask| go; FFN units go globally by |mask| (``ffn_prune_ratio``); then all but the ``module_keep_ratio``
most important adapters are removed, and of the kept adapters' ranks the ``rank_keep_ratio`` most important
survive globally (an adapter left with no rank is removed). Pruning is physical: qkv/proj/fc1/fc2 get smaller
weights, ``attn.num_heads``/``attn.attn_dim`` change per block, and the surviving mask values are folded into the
weight columns they scale (and into the adapters' A columns), so the pruned model computes exactly what the
masked model computes with the pruned masks set to 0.

Stage 3 is ordinary LoRA fine-tuning (optionally ALaST) of the pruned model in the same trainer.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LightPeftConfig
from .lora import LoRALinear, keep_ranks, lora_modules, remove_adapter


class InputMask(nn.Module):
    """``module(x * repeat(mask, group_size))``: one learnable scalar per group of input features."""

    def __init__(self, module: nn.Module, groups: int, group_size: int):
        super().__init__()
        self.inner = module
        self.group_size = int(group_size)
        w = next(module.parameters())
        self.mask = nn.Parameter(torch.ones(groups, device=w.device, dtype=torch.float32))

    def expanded(self) -> torch.Tensor:
        return self.mask.repeat_interleave(self.group_size) if self.group_size > 1 else self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expanded().to(x.dtype)
        if isinstance(self.inner, LoRALinear):  # saves one activation fewer (see LoRALinear.forward)
            return self.inner(x, input_scale=scale)
        return self.inner(x * scale)

    def extra_repr(self) -> str:
        return f"groups={self.mask.numel()}, group_size={self.group_size}"


def _check_block(i: int, block: nn.Module) -> None:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if attn is None or not hasattr(attn, "attn_dim") or not hasattr(attn, "proj"):
        raise TypeError(f"block {i}: Light-PEFT needs timm's Attention (qkv, proj, num_heads, attn_dim)")
    if not isinstance(attn.norm, nn.Identity):
        raise TypeError(f"block {i}: attention with scale_norm normalises across heads; its heads cannot be pruned")
    if mlp is None or not all(hasattr(mlp, n) for n in ("fc1", "fc2")) or not isinstance(mlp.norm, nn.Identity):
        raise TypeError(f"block {i}: Light-PEFT needs timm's Mlp (fc1 -> act -> fc2, no hidden norm)")


def add_masks(model: nn.Module) -> None:
    """Wrap every block's ``attn.proj`` (head masks) and ``mlp.fc2`` (unit masks) in :class:`InputMask`."""
    for i, block in enumerate(model.blocks):
        _check_block(i, block)
        attn, mlp = block.attn, block.mlp
        attn.proj = InputMask(attn.proj, attn.num_heads, attn.head_dim)
        mlp.fc2 = InputMask(mlp.fc2, mlp.fc1.out_features, 1)


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter by the path of the Linear it adapts: an adapter inside a mask is named without the mask's
    ``.inner``, so names stay valid once pruning removes the masks."""
    return {name.removesuffix(".inner"): m for name, m in lora_modules(model).items()}


def masks(model: nn.Module) -> list[InputMask]:
    return [m for m in model.modules() if isinstance(m, InputMask)]


def mask_penalty(model: nn.Module) -> torch.Tensor:
    """``sum |m|`` over every mask (multiply by ``mask_l1``)."""
    return sum(m.mask.abs().sum() for m in masks(model))


class ImportanceRecorder:
    """Averages adapter and rank importances over the second half of the estimation steps.

    Call :meth:`before_forward` before a step's forward and :meth:`after_backward` once its gradients exist
    (unscaled); :meth:`stop` removes the hooks. While a recorded step's forward runs, forward hooks on each adapter
    (and on its dropout, for the exact input of A) measure ``||dW x|| / ||W x||`` from the adapter's own input, with
    ``W x`` the base weight's product without its bias. ``state_dict`` makes an interrupted estimation resume to the
    same result.
    """

    def __init__(self, model: nn.Module, estimation_steps: int):
        self.modules = adapters(model)
        if not self.modules:
            raise ValueError("Light-PEFT estimation needs LoRA adapters in the model")
        self.first = estimation_steps // 2  # first recorded step: the second half
        self.module_sum = {n: 0.0 for n in self.modules}
        self.rank_sum = {n: torch.zeros(m.r) for n, m in self.modules.items()}
        self.count = 0
        self._measuring = False
        self._dropped: dict[str, torch.Tensor] = {}  # each adapter's input after its dropout, this forward
        self._importance: dict[str, torch.Tensor] = {}  # each adapter's importance, this step
        self._hooks = []
        for name, m in self.modules.items():
            self._hooks.append(m.dropout.register_forward_hook(partial(self._on_dropout, name)))
            self._hooks.append(m.register_forward_hook(partial(self._on_adapter, name), with_kwargs=True))

    def recording(self, step: int) -> bool:
        return step >= self.first

    def before_forward(self, step: int) -> None:
        self._measuring = self.recording(step)
        self._importance = {}

    def _on_dropout(self, name: str, module, args, output: torch.Tensor) -> None:
        if self._measuring:
            self._dropped[name] = output

    @torch.no_grad()
    def _on_adapter(self, name: str, module: LoRALinear, args, kwargs, output) -> None:
        if not self._measuring:
            return
        x = args[0]
        scale = kwargs.get("input_scale", args[1] if len(args) > 1 else None)
        wx = F.linear(x if scale is None else x * scale, module.base.weight)
        delta = module.low_rank(self._dropped.pop(name), scale)  # the forward's own dW x, dropout mask included
        self._importance[name] = delta.float().norm() / wx.float().norm().clamp_min(1e-12)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if not self.recording(step):
            return
        for n, m in self.modules.items():
            importance = self._importance.get(n)
            if importance is None or m.lora_A.grad is None or m.lora_B.grad is None:
                raise RuntimeError(f"{n}: no forward/gradient recorded this step (is the adapter trainable?)")
            self.module_sum[n] += float(importance)
            a = (m.lora_A.float() * m.lora_A.grad.float()).mean(dim=1).abs()
            b = (m.lora_B.float() * m.lora_B.grad.float()).mean(dim=0).abs()
            self.rank_sum[n] += (a + b).cpu()
        self.count += 1

    def stop(self) -> None:
        """Remove the hooks (the adapters compute as plain LoRA again); idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._measuring, self._dropped, self._importance = [], False, {}, {}

    def module_importance(self) -> dict[str, float]:
        return {n: s / max(1, self.count) for n, s in self.module_sum.items()}

    def rank_importance(self) -> dict[str, torch.Tensor]:
        return {n: s / max(1, self.count) for n, s in self.rank_sum.items()}

    def state_dict(self) -> dict:
        return {"module_sum": dict(self.module_sum), "rank_sum": {n: t.clone() for n, t in self.rank_sum.items()},
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.module_sum = {n: float(v) for n, v in state["module_sum"].items()}
        self.rank_sum = {n: t.clone() for n, t in state["rank_sum"].items()}
        self.count = int(state["count"])


def _lowest(scores: torch.Tensor, n: int) -> set[int]:
    """Indices of the ``n`` smallest scores (ties broken by index, so the choice is deterministic)."""
    if n <= 0:
        return set()
    order = sorted(range(scores.numel()), key=lambda j: (float(scores[j]), j))
    return set(order[:n])


def plan_pruning(model: nn.Module, config: LightPeftConfig, recorder: ImportanceRecorder | None) -> dict:
    """Stage 2's decisions as plain data (stored in checkpoints and the summary).

    Returns:
        ``{"heads": [[kept head indices] per block], "units": [[kept FFN unit indices] per block],
        "adapters": {module path: [kept rank indices]}}``; adapters not listed are removed.
    """
    heads, units_scores = [], []
    for block in model.blocks:
        proj, fc2 = block.attn.proj, block.mlp.fc2
        if not isinstance(proj, InputMask) or not isinstance(fc2, InputMask):
            raise TypeError("plan_pruning needs the masks of add_masks()")
        m = proj.mask.detach().abs().cpu()
        drop = _lowest(m, math.floor(config.head_prune_ratio * m.numel()))
        heads.append([h for h in range(m.numel()) if h not in drop])
        units_scores.append(fc2.mask.detach().abs().cpu())
    # FFN units: one global ranking; every block keeps at least one unit so its MLP still exists.
    flat = [(float(s), b, j) for b, scores in enumerate(units_scores) for j, s in enumerate(scores)]
    flat.sort()
    n_drop = math.floor(config.ffn_prune_ratio * len(flat))
    dropped = [set() for _ in units_scores]
    for _, b, j in flat:
        if n_drop == 0:
            break
        if len(dropped[b]) < units_scores[b].numel() - 1:
            dropped[b].add(j)
            n_drop -= 1
    units = [[j for j in range(s.numel()) if j not in dropped[b]] for b, s in enumerate(units_scores)]

    ranks_kept: dict[str, list[int]] = {}
    if recorder is not None:
        imp = recorder.module_importance()
        names = sorted(imp, key=lambda n: (-imp[n], n))
        kept = names[:max(1, math.ceil(config.module_keep_ratio * len(names)))]
        ranks = recorder.rank_importance()
        pool = sorted(((-float(s), n, r) for n in kept for r, s in enumerate(ranks[n])))
        n_keep = max(1, math.ceil(config.rank_keep_ratio * len(pool)))
        for _, n, r in pool[:n_keep]:
            ranks_kept.setdefault(n, []).append(r)
        ranks_kept = {n: sorted(rs) for n, rs in sorted(ranks_kept.items())}
    return {"heads": heads, "units": units, "adapters": ranks_kept}


def _slice(module: nn.Module, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None,
           in_scale: torch.Tensor | None = None) -> nn.Module:
    """A copy of a Linear or LoRALinear keeping rows ``out_idx`` and columns ``in_idx`` (columns scaled by
    ``in_scale``, the folded mask values)."""
    base = module.base if isinstance(module, LoRALinear) else module
    w, b = base.weight, base.bias
    with torch.no_grad():
        weight = w if out_idx is None else w[out_idx]
        bias = b if (b is None or out_idx is None) else b[out_idx]
        if in_idx is not None:
            weight = weight[:, in_idx]
        if in_scale is not None:
            weight = weight * in_scale.to(weight.dtype)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(weight)
        if b is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(w.requires_grad)
    if b is not None:
        new.bias.requires_grad_(b.requires_grad)
    if not isinstance(module, LoRALinear):
        return new
    lora = module
    with torch.no_grad():
        a = lora.lora_A if in_idx is None else lora.lora_A[:, in_idx]
        if in_scale is not None:
            a = a * in_scale.to(a.dtype)
        bb = lora.lora_B if out_idx is None else lora.lora_B[out_idx]
        lora.base = new
        lora.lora_A = nn.Parameter(a.clone(), requires_grad=lora.lora_A.requires_grad)
        lora.lora_B = nn.Parameter(bb.clone(), requires_grad=lora.lora_B.requires_grad)
    return lora


def _unwrap(module: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    if isinstance(module, InputMask):
        return module.inner, module.expanded().detach()
    return module, None


def apply_pruning(model: nn.Module, spec: dict) -> None:
    """Physically prune ``model`` to ``spec`` (from :func:`plan_pruning`), in place; masks are folded and removed.

    Adapters are pruned by ``spec["adapters"]`` only when the model has adapters (a merged model has none).
    """
    if len(spec["heads"]) != len(model.blocks) or len(spec["units"]) != len(model.blocks):
        raise ValueError(f"pruning spec covers {len(spec['heads'])} blocks, model has {len(model.blocks)}")
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        hd = attn.head_dim
        heads = torch.as_tensor(spec["heads"][i], dtype=torch.long)
        units = torch.as_tensor(spec["units"][i], dtype=torch.long)
        if heads.numel() == 0 or units.numel() == 0:
            raise ValueError(f"pruning spec leaves block {i} with no heads or no FFN units")
        proj, head_scale = _unwrap(attn.proj)
        fc2, unit_scale = _unwrap(mlp.fc2)
        cols = (heads[:, None] * hd + torch.arange(hd)).flatten()
        rows = torch.cat([s * attn.attn_dim + cols for s in range(3)])
        dev = next(attn.parameters()).device
        cols, rows, units = cols.to(dev), rows.to(dev), units.to(dev)
        attn.qkv = _slice(attn.qkv, out_idx=rows)
        if getattr(attn, "gate", None) is not None:
            attn.gate = _slice(attn.gate, out_idx=cols)
        attn.proj = _slice(proj, in_idx=cols, in_scale=None if head_scale is None else head_scale[cols])
        attn.num_heads = int(heads.numel())
        attn.attn_dim = attn.num_heads * hd
        mlp.fc1 = _slice(mlp.fc1, out_idx=units)
        mlp.fc2 = _slice(fc2, in_idx=units, in_scale=None if unit_scale is None else unit_scale[units])
    kept = spec.get("adapters") or {}
    for name, module in adapters(model).items():  # masks are gone: these are the modules' paths now
        if name in kept:
            keep_ranks(module, torch.as_tensor(kept[name], dtype=torch.long, device=module.lora_A.device))
        else:
            remove_adapter(model, name)


def structure_from_state_dict(model: nn.Module, state: dict) -> dict | None:
    """The (head, unit) pruning that makes ``model`` (timm's full architecture) match ``state``'s shapes, or None
    when it already does. Kept indices are the leading ones: the values come from ``state`` anyway."""
    heads, units, pruned = [], [], False
    for i, block in enumerate(model.blocks):
        qkv = state.get(f"blocks.{i}.attn.qkv.weight")
        fc1 = state.get(f"blocks.{i}.mlp.fc1.weight")
        if qkv is None or fc1 is None:
            return None
        h = qkv.shape[0] // (3 * block.attn.head_dim)
        heads.append(list(range(h)))
        units.append(list(range(fc1.shape[0])))
        pruned |= h != block.attn.num_heads or fc1.shape[0] != block.mlp.fc1.out_features
    return {"heads": heads, "units": units, "adapters": {}} if pruned else None

