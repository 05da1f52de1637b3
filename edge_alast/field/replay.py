"""The replay sample of a model store: a bounded, per-class reservoir of the images the model was trained on.

Pure policy: plain data in, plain data out, no I/O. An item is a dict with at least ``bytes`` (its file size);
the store decides what else it holds (file name, sha256). A sample is ``{class: {"seen": n, "items": [...]}}``:
``seen`` counts every training image of that class ever offered, so reservoir sampling (Vitter's algorithm R) keeps
each class's items a uniform sample of everything that class has seen, however many updates brought them.

The caps are per class: ``max_images // classes`` items and ``max_bytes // classes`` bytes each, so every class
seen stays represented however unbalanced the updates are. When the caps fall (more classes, lower options) a
class's items are thinned by uniform random removal, which keeps a uniform sample uniform. The bytes cap is met
the same way after the count cap, so with images of very different sizes the sample leans towards small files.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np


def class_caps(classes: int, max_images: int, max_bytes: int) -> tuple[int, int]:
    """The (images, bytes) each of ``classes`` classes may keep under the store-wide caps."""
    if classes < 1:
        return 0, 0
    return max_images // classes, max_bytes // classes


def offer(sample: Mapping[str, Mapping[str, Any]], new: Mapping[str, Iterable[dict]], *, max_images: int,
          max_bytes: int, seed: int | Iterable[int]) -> dict[str, dict[str, Any]]:
    """The sample after offering ``new`` items (class -> items, in a fixed order) under the caps.

    Args:
        sample: The sample so far (not modified).
        new: The training images of an update, per class.
        max_images, max_bytes: Store-wide caps, shared evenly by every class of the result (``0``: no replay).
        seed: Seeds the draws (the same seed and inputs give the same sample, so an interrupted update that
            starts again draws the same).

    Returns:
        ``{class: {"seen": int, "items": [item, ...]}}`` for every class in ``sample`` or ``new``, sorted.
    """
    if max_images < 0 or max_bytes < 0:
        raise ValueError(f"replay caps must be >= 0, got {max_images} images, {max_bytes} bytes")
    rng = np.random.default_rng(seed)
    classes = sorted(set(sample) | set(new))
    cap_images, cap_bytes = class_caps(len(classes), max_images, max_bytes)
    out = {}
    for name in classes:
        seen = int(sample.get(name, {}).get("seen", 0))
        items = list(sample.get(name, {}).get("items", []))
        for item in new.get(name, ()):
            seen += 1
            if len(items) < cap_images:
                items.append(item)
            else:  # algorithm R: the seen-th item replaces a random one with probability cap / seen
                j = int(rng.integers(seen))
                if j < cap_images:
                    items[j] = item
        while items and (len(items) > cap_images or sum(int(i["bytes"]) for i in items) > cap_bytes):
            items.pop(int(rng.integers(len(items))))
        out[name] = {"seen": seen, "items": items}
    return out


def items(sample: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Every item of ``sample``, class by class."""
    return [item for name in sorted(sample) for item in sample[name]["items"]]


def totals(sample: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """``{"images": n, "bytes": b}`` of the sample."""
    every = items(sample)
    return {"images": len(every), "bytes": sum(int(i["bytes"]) for i in every)}
