"""LoRA adapters that wrap a timm ViT's existing ``nn.Linear`` layers (no timm forward is copied).

``apply_lora(model, LoraConfig(...))`` replaces each targeted Linear of every block (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``) by a :class:`LoRALinear` holding that same Linear as ``base`` (frozen) plus the low-rank
pair ``lora_A`` [r, in] and ``lora_B`` [out, r]. ``merge_lora(model)`` folds every adapter into its base weight
and puts plain Linears back, so a saved or exported model has timm's own architecture.

Why in-house rather than ``peft``: peft pulls ``transformers``, ``accelerate``, ``huggingface_hub`` and their
dependencies (hundreds of MB on a board that has a few GB), and Light-PEFT needs to slice single ranks and
rows/columns of adapters, which is a few lines here and a fight with peft's module bookkeeping.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig

TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class LoRALinear(nn.Module):
    """``base(x) + alpha/r * B(A(dropout(x)))`` around an existing Linear.

    ``lora_B`` starts at zero, so a fresh adapter leaves the layer's output unchanged.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.alpha = float(alpha)
        self.scaling = self.alpha / r  # fixed at creation: pruning ranks later keeps the surviving ranks' scale
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's contribution ``alpha/r * B A (dropout(x) * input_scale)``."""
        return self.low_rank(self.dropout(x), input_scale)

    def low_rank(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha/r * B A (x * input_scale)``: the adapter's contribution for an input already through its dropout."""
        a = self.lora_A if input_scale is None else self.lora_A * input_scale
        return F.linear(F.linear(x, a), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``input_scale`` (per input feature) scales the input of both paths. It is folded into A for the adapter
        (a [r, in] product) so that autograd keeps one activation, ``x``, for both the scale's and A's gradients,
        instead of ``x`` and ``x * input_scale`` (the frozen base saves no input)."""
        xs = x if input_scale is None else x * input_scale
        return self.base(xs) + self.delta(x, input_scale)

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (eval mode: dropout off)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + (self.lora_B.float() @ self.lora_A.float()).to(base.weight.dtype)
                             * self.scaling)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        out.weight.requires_grad_(base.weight.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(base.bias.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), leaf


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, leaf = _parent(model, path)
    setattr(parent, leaf, new)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the targeted Linears of every block in :class:`LoRALinear` and freeze every base parameter of the
    blocks. Returns the wrapped module paths (``blocks.3.attn.qkv``...)."""
    config.validate()
    wrapped = []
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            p.requires_grad_(False)
        for target in config.targets:
            path = f"blocks.{i}.{TARGET_PATHS[target]}"
            try:
                linear = model.get_submodule(path)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"--lora-targets {target}: {path} is not an nn.Linear in {type(model).__name__} "
                                f"({type(linear).__name__})")
            replace_module(model, path, LoRALinear(linear, config.r, config.alpha, config.dropout))
            wrapped.append(path)
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter in the model by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear, in place; returns the model (now timm's plain architecture)."""
    for name, module in list(lora_modules(model).items()):
        replace_module(model, name, module.merged())
    return model


def remove_adapter(model: nn.Module, path: str) -> None:
    """Drop one adapter, putting its (unchanged) base Linear back."""
    module = model.get_submodule(path)
    if not isinstance(module, LoRALinear):
        raise TypeError(f"{path} is not a LoRALinear")
    replace_module(model, path, module.base)


def keep_ranks(module: LoRALinear, ranks: torch.Tensor) -> None:
    """Keep only the given rank indices of an adapter (rows of A, columns of B)."""
    with torch.no_grad():
        module.lora_A = nn.Parameter(module.lora_A[ranks].clone(), requires_grad=module.lora_A.requires_grad)
        module.lora_B = nn.Parameter(module.lora_B[:, ranks].clone(), requires_grad=module.lora_B.requires_grad)
