"""Which parameters of a model can ever train in a run: one explicit record, built once from the method.

The step plan freezes and unfreezes blocks *among* these parameters; the patch, the FLOP counter, the planner's
calibration and cost model and the optimizer all read this record, never ``requires_grad`` (which the patch
toggles every step), so the order in which they are set up does not matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..methods import BLOCKS_ADAPTERS, BLOCKS_ALL, BLOCKS_NONE, MethodSpec
from .names import ADAPTER_PARAMS, is_embedding, is_head


@dataclass(frozen=True)
class TrainableSet:
    """Names of the parameters that can ever train, and how a block's own parameters train.

    Attributes:
        names: Parameter names (``model.named_parameters()``) that get an optimizer state.
        embeddings: Whether the patch/position embeddings train (then every block passes gradients down).
        final_norm: Whether the norm before the head trains (then the head passes gradients down).
    """

    names: frozenset[str]
    embeddings: bool = False
    final_norm: bool = True

    @classmethod
    def for_method(cls, model: nn.Module, spec: MethodSpec, *, train_embeddings: bool | None = None,
                   freeze_below: int = 0) -> "TrainableSet":
        """What ``spec`` trains in ``model`` (as built: adapters and masks already added). ``train_embeddings``:
        None for the method's default (``full`` trains them); blocks below ``freeze_below`` never train, and then
        neither do the embeddings under them (nothing below that block stores activations)."""
        wanted = spec.embeddings if train_embeddings is None else train_embeddings
        embeddings = wanted and spec.blocks != BLOCKS_NONE and freeze_below <= 0
        names = set()
        for name, _ in model.named_parameters():
            if name.startswith("blocks."):
                leaf = name.rsplit(".", 1)[-1]
                train = int(name.split(".", 2)[1]) >= freeze_below and (
                    spec.blocks == BLOCKS_ALL or (spec.blocks == BLOCKS_ADAPTERS and leaf in ADAPTER_PARAMS))
            elif spec.blocks == BLOCKS_NONE:
                train = is_head(name)
            else:
                train = embeddings if is_embedding(name) else True
            if train:
                names.add(name)
        return cls(frozenset(names), embeddings=embeddings, final_norm=spec.blocks != BLOCKS_NONE)

    @classmethod
    def from_flags(cls, model: nn.Module) -> "TrainableSet":
        """The parameters marked ``requires_grad`` now (for code that sets the flags by hand, e.g. tests)."""
        names = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
        return cls(names, embeddings=any(is_embedding(n) for n in names),
                   final_norm=any(not n.startswith("blocks.") and not is_head(n) and not is_embedding(n)
                                  for n in names))

    def parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of ``model`` in this set, in model order."""
        return ((n, p) for n, p in model.named_parameters() if n in self.names)

    def block_flags(self, model: nn.Module, index: int) -> list[bool]:
        """Per parameter of ``model.blocks[index]``, whether it trains when the block trains."""
        prefix = f"blocks.{index}."
        return [prefix + n in self.names for n, _ in model.blocks[index].named_parameters()]

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` to this set (the state before any plan freezes a block)."""
        for n, p in model.named_parameters():
            p.requires_grad_(n in self.names)


def load_trainable(model: nn.Module, trainable: TrainableSet, tensors: Mapping[str, torch.Tensor], *, source: str,
                   complete: bool = False) -> None:
    """Copy ``tensors`` into ``model``'s parameters of the same names, each one in ``trainable`` (a fleet round's
    start, the fleet's global model).

    Args:
        source: What the tensors are, for the errors (``start``, ``global tensors``).
        complete: ``tensors`` must cover every parameter of ``trainable`` (else a subset is loaded).

    Raises:
        ConfigError: a name that is not a trainable parameter, a shape that is not the parameter's, or (``complete``)
            a trainable parameter left out; nothing is copied then.
    """
    params = dict(trainable.parameters(model))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} tensors are not trainable parameters of this run "
                          f"({_first(unknown)})")
    missing = sorted(set(params) - set(tensors)) if complete else []
    if missing:
        raise ConfigError(f"{source}: {len(missing)} trainable parameters of this run are missing ({_first(missing)})")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ConfigError(f"{source}: {name} has shape {tuple(value.shape)}, the model's is "
                              f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _first(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
