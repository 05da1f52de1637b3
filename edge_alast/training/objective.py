"""What a training step minimises: the cross-entropy plus named penalties.

The loop logs the cross-entropy as ``loss`` (comparable across methods) and each penalty under its own metric name:

* ``loss/mask_l1``: Light-PEFT's L1 on the masks, ``mask_l1 * sum|m|``, during the estimation stage;
* ``loss/proximal``: FedProx's pull toward the global model a fleet round started from, ``mu/2 * |w - w_start|^2``
  over the trainable tensors (:class:`ProximalTerm`; ``train(..., start={"proximal_mu": mu, ...})``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..adapters.lightpeft import mask_penalty
from .stage import Stage


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx's ``mu/2 * |w - w_start|^2`` over the trainable tensors, ``w_start`` their values when the round
    started. Its gradient, ``mu * (w - w_start)``, reaches the parameters that train in a step; one frozen for the
    step gets none (no gradient at all), though its distance still counts in the logged value."""

    mu: float
    start: dict[str, torch.Tensor]

    @classmethod
    def at(cls, mu: float, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> "ProximalTerm":
        """The term anchored at the parameters' values now."""
        return cls(float(mu), {n: p.detach().clone() for n, p in named_parameters})

    def __call__(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> torch.Tensor:
        return self.mu / 2 * sum((p - self.start[n]).pow(2).sum() for n, p in named_parameters)


def penalties(model: nn.Module, stage: Stage, mask_l1: float,
              proximal: ProximalTerm | None = None) -> dict[str, torch.Tensor]:
    """The terms this step adds to the cross-entropy, by metric name (see the module docstring)."""
    terms = {}
    if stage.recorder is not None and mask_l1 > 0:  # Light-PEFT's estimation stage
        terms["loss/mask_l1"] = mask_l1 * mask_penalty(model)
    if proximal is not None:
        terms["loss/proximal"] = proximal(stage.trainable.parameters(model))
    return terms
