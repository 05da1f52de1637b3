"""Evaluation: accuracy and mean loss of a model over image samples, every token, never augmented. The trainer's
validation points and final evaluation, the fleet server's global model and ``edge-alast eval`` all use it."""
from __future__ import annotations

from contextlib import nullcontext

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
