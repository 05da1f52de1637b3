"""Evaluation: accuracy and mean loss of a model over image samples, every token, never augmented. The trainer's
validation points and final evaluation, the fleet server's global model and ``edge-alast eval`` all use it."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.loader import iter_batches


@torch.no_grad()
def evaluate(model, samples, preprocess, batch_size: int, device: str, autocast=None, bad=None,
             on_warning=None) -> tuple[float | None, float | None]:
    """Accuracy and mean loss over ``samples`` with every token (eval mode), never augmented.

    Args:
        bad: An :class:`~edge_alast.data.images.BadImages`: files that fail to decode are left out (accuracy and loss
            are over the images evaluated), named through ``on_warning`` and counted against its limit (DataError
            above it). None: such a file raises DataError.
    """
    if not samples:
        return None, None
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for x, y in iter_batches(samples, batch_size, preprocess, bad=bad, on_warning=on_warning):
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    model.train(was_training)
    if not count:
        return None, None
    return correct / count, loss_sum / count


@contextmanager
def train_view(model, keep_ratios: Sequence[float], count_prefix: bool = False, token_multiple: int = 1):
    """Within the block, the model drops tokens in eval mode as ALaST training did with ``keep_ratios`` (per block,
    e.g. a run's mean keep ratios): evaluating under it measures how much of a gap between training and evaluation
    comes from the token view (evaluation otherwise sees every token). No block trains; yields the patch handle
    (its ``tokens_in`` are the tokens each block saw in the last batch)."""
    from ..alast.patch import apply_patch
    from ..alast.policy import StepPlan

    handle = apply_patch(model, token_multiple=token_multiple, eval_view=True)
    try:
        handle.set_plan(StepPlan(keep_ratios=tuple(float(r) for r in keep_ratios),
                                 trainable=(False,) * len(keep_ratios), count_prefix=count_prefix))
        yield handle
    finally:
        handle.remove()
