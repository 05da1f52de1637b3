"""Training data for the PyTorch trainer: preprocessing to tensors and a resumable batch order.

The order of training batches is a pure function of (seed, step): step s reads batch s mod E of epoch s div E
(E = batches per epoch) from a permutation seeded by (seed, epoch). Resuming at step s needs no loader state.
File scanning and image decoding live in the torch-free :mod:`edge_alast.images`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError
from .images import load_image


@dataclass(frozen=True)
class Preprocess:
    """Resize to a square ``img_size`` and normalise with the model's mean/std (see :func:`images.load_image`)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, path: Path) -> torch.Tensor:
        return torch.from_numpy(load_image(path, self.img_size, self.mean, self.std, self.interpolation))


class BatchOrder:
    """Training batches as a pure function of the step (see module docstring). Drops the last partial batch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        if num_samples < 1:
            raise DataError("no training images")
        self.num_samples = num_samples
        self.batch_size = min(batch_size, num_samples)
        self.seed = int(seed)
        self.batches_per_epoch = num_samples // self.batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=g).tolist()
        return self._perm[b * self.batch_size:(b + 1) * self.batch_size]


def load_batch(samples: Sequence[tuple[Path, int]], indices: Sequence[int], preprocess: Preprocess):
    """Stack the images and labels at ``indices``."""
    xs = torch.stack([preprocess(samples[i][0]) for i in indices])
    ys = torch.tensor([samples[i][1] for i in indices], dtype=torch.long)
    return xs, ys


def iter_batches(samples: Sequence[tuple[Path, int]], batch_size: int, preprocess: Preprocess):
    """All samples in order, in batches (evaluation)."""
    for start in range(0, len(samples), batch_size):
        yield load_batch(samples, range(start, min(start + batch_size, len(samples))), preprocess)
