"""Training data for the PyTorch trainer: preprocessing to tensors, a resumable batch order, and the loader that
decodes the next batches in the background.

The order of training batches is a pure function of (seed, step): step s reads batch s mod E of epoch s div E
(E = batches per epoch) from a permutation seeded by (seed, epoch). Resuming at step s needs no loader state.
File scanning and image decoding live in the torch-free :mod:`edge_alast.data.images`.

:class:`BatchLoader` decodes the images of the next steps in a thread pool while the current step computes (PIL's
decoders and resizers release the GIL). Only where work runs is concurrent: which images a step reads and how each
is augmented (a generator seeded by seed, step and position, :func:`images.augment_rng`) are fixed by the step,
and the bookkeeping of unreadable files (:class:`images.BadImages`) happens on the calling thread in step order.
So a batch is the same whatever the number of threads, and a resumed run replays exactly.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError
from .images import DEFAULT_LIMITS, LEGACY_CROP, RRC_SCALE, BadImages, ImageLimits, augment_rng, load_image

# How many steps beyond the current one the loader decodes ahead: one keeps the pool busy while a step computes;
# a second absorbs a batch of slow files. Each is batch x 3 x img_size^2 float32 (9.6 MB at 16 x 224 px).
PREFETCH_STEPS = 2


@dataclass(frozen=True)
class Preprocess:
    """Image to tensor: the model's eval transform (resize by ``crop_pct``, centre crop; see
    :mod:`edge_alast.data.images`) and its mean/std. Training views add ``augment``; evaluation never does."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = LEGACY_CROP["crop_pct"]
    crop_mode: str = LEGACY_CROP["crop_mode"]
    limits: ImageLimits = DEFAULT_LIMITS  # files over these are refused (DataError: counted as unreadable)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Preprocess":
        """From a model's facts (:func:`export.load_run_model`, ONNX metadata); without crop facts, the squash
        of models exported before they were recorded."""
        return cls(int(meta["img_size"]), tuple(meta["mean"]), tuple(meta["std"]), meta.get("interpolation", "bicubic"),
                   float(meta.get("crop_pct", LEGACY_CROP["crop_pct"])),
                   meta.get("crop_mode", LEGACY_CROP["crop_mode"]))

    @property
    def eval_transform(self) -> dict[str, Any]:
        """The facts that reproduce the eval transform (summary.json, ONNX metadata)."""
        return {"crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "interpolation": self.interpolation}

    def load(self, path: Path, augment: str = "none", rng: np.random.Generator | None = None) -> np.ndarray:
        """One image as a float32 CHW array (numpy: decoded on loader threads without touching torch)."""
        return load_image(path, self.img_size, self.mean, self.std, self.interpolation, crop_pct=self.crop_pct,
                          crop_mode=self.crop_mode, augment=augment, rng=rng, rrc_scale=RRC_SCALE,
                          limits=self.limits)

    def __call__(self, path: Path) -> torch.Tensor:
        return torch.from_numpy(self.load(path))


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


def iter_batches(samples: Sequence[tuple[Path, int]], batch_size: int, preprocess: Preprocess,
                 bad: BadImages | None = None, on_warning: Callable[[str], None] | None = None):
    """All samples in order, in batches (evaluation). With ``bad``, files that fail to decode are left out, named
    through ``on_warning`` and counted there (an empty batch is not yielded); without it they raise DataError."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if bad is None:
            yield load_batch(chunk, range(len(chunk)), preprocess)
            continue
        kept, values, new = bad.load_each([path for path, _ in chunk], preprocess.load)
        for failure in new:
            (on_warning or _ignore)(bad.warning(failure))
        if values:
            yield _stack(values), torch.tensor([chunk[k][1] for k in kept], dtype=torch.long)


def _ignore(message: str) -> None:
    pass


def _stack(values: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(values))


class BatchLoader:
    """Training batches by step, decoded ``ahead`` steps in advance by ``threads`` background threads (see module
    docstring).

    ``get(step)`` returns the batch of ``order.indices(step)``, augmented with ``augment``. Files that fail to
    decode are left out of the batch, named once through ``on_warning`` and counted in ``bad`` (DataError once they
    exceed its ``max_bad_fraction``, or when no training image is left). A batch whose every file is unreadable
    comes back empty (zero rows): the trainer then makes no update for that step, so the data of every later step
    stays the one the step number says.

    Args:
        samples: The training (path, label) pairs ``order`` indexes.
        bad: The record of unreadable files (checkpointed by the trainer); None: a failure raises DataError.
        augment: ``none``, ``flip`` or ``rrc-flip`` (:mod:`edge_alast.data.images`), seeded by ``seed``.
        threads: Decoding threads; 0 decodes on the calling thread, inside ``get``.
        steps: Steps of the run (nothing is decoded for steps at or past it); None: no end.
        ahead: Steps decoded ahead of the one asked for.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], order, preprocess: Preprocess, *,
                 bad: BadImages | None = None, augment: str = "none", seed: int = 0, threads: int = 0,
                 steps: int | None = None, ahead: int = PREFETCH_STEPS,
                 on_warning: Callable[[str], None] | None = None):
        self.samples, self.order, self.preprocess = samples, order, preprocess
        self.bad, self.augment, self.seed = bad, augment, int(seed)
        self.steps, self.ahead = steps, max(0, int(ahead))
        self.on_warning = on_warning or _ignore
        self.threads = max(0, int(threads))
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="edge-alast-loader")
                      if self.threads else None)
        self._pending: dict[int, tuple[list[int], list[Future] | None]] = {}

    # ------------------------------------------------------------------ decoding (any thread)
    def _load(self, step: int, position: int, index: int) -> np.ndarray | None:
        path = self.samples[index][0]
        if self.bad is not None and path in self.bad:
            return None  # known unreadable: the calling thread leaves it out without asking for the value
        rng = augment_rng(self.seed, step, position) if self.augment != "none" else None
        return self.preprocess.load(path, self.augment, rng)

    def _submit(self, step: int) -> None:
        indices = list(self.order.indices(step))  # on the calling thread: BatchOrder caches one epoch
        futures = None
        if self._pool is not None:
            futures = [self._pool.submit(self._load, step, pos, i) for pos, i in enumerate(indices)]
        self._pending[step] = (indices, futures)

    # ------------------------------------------------------------------ the calling thread, in step order
    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step`` as (images, labels); may have fewer rows than the batch size, or none (see class
        docstring).

        Raises:
            DataError: unreadable files exceed ``bad``'s limit, or no training image is readable.
        """
        if self._pool is None and self.threads:
            raise RuntimeError("BatchLoader is closed")
        last = step + self.ahead if self.steps is None else min(step + self.ahead, self.steps - 1)
        for s in [s for s in self._pending if not step <= s <= last]:  # a jump (tests, tools): drop stale work
            self._cancel(self._pending.pop(s)[1])
        for s in range(step, max(step, last) + 1):  # this step first: the pool works in submission order
            if s not in self._pending:
                self._submit(s)
        indices, futures = self._pending.pop(step)
        try:
            return self._assemble(step, indices, futures)
        except BaseException:
            self.close()
            raise

    def _assemble(self, step: int, indices: list[int], futures: list[Future] | None):
        position = {self.samples[i][0]: pos for pos, i in enumerate(indices)}
        if futures is None:
            def load(path):
                return self._load(step, position[path], indices[position[path]])
        else:
            def load(path):
                return futures[position[path]].result()
        paths = [self.samples[i][0] for i in indices]
        if self.bad is None:
            kept, values = list(range(len(paths))), [load(p) for p in paths]
        else:
            kept, values, new = self.bad.load_each(paths, load)
            for failure in new:
                self.on_warning(self.bad.warning(failure))
            if new and all(path in self.bad for path, _ in self.samples):
                raise DataError(f"{self.bad.option}: none of the {len(self.samples)} training images is readable "
                                f"(first: {self.bad.failures[0][0]}: {self.bad.failures[0][1]})")
        labels = torch.tensor([self.samples[indices[k]][1] for k in kept], dtype=torch.long)
        if not values:
            self.on_warning(f"step {step + 1}: every image of its batch is unreadable; the step makes no update")
            size = self.preprocess.img_size
            return torch.zeros(0, 3, size, size), labels
        return _stack(values), labels

    @staticmethod
    def _cancel(futures: list[Future] | None) -> None:
        for future in futures or ():
            future.cancel()

    def close(self) -> None:
        """Stop the threads (work not started is dropped; the image being decoded finishes). Idempotent."""
        for _, futures in self._pending.values():
            self._cancel(futures)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
