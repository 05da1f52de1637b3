"""Shared fixtures: tiny image folders, finished tiny runs, and the real assets when present (builders that take
arguments are in ``tests/helpers.py``).

Tests that need real weights or images are marked ``assets``. They skip when the assets are absent, except with
``EDGE_ALAST_REQUIRE_ASSETS=1`` (set by .ci/run), where a missing asset fails the test instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, make_image_folder, make_run

SHARED_WEIGHTS = REPO.parent / "shared" / "assets" / "vit_small_patch14_dinov2.imgfocus.safetensors"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    if os.environ.get("EDGE_ALAST_REQUIRE_ASSETS") == "1":
        pytest.fail(f"{what} not found at {path} (EDGE_ALAST_REQUIRE_ASSETS=1)")
    pytest.skip(f"{what} not found at {path}")


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    return _require(SHARED_WEIGHTS, "shared ViT-S/14 weights")


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory) -> Path:
    """A small real-image ImageFolder (Fashion-MNIST: 40 train and 20 val images per class, 4 classes)."""
    _require(FASHION_MNIST / "train-images-idx3-ubyte.gz", "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from make_fashion_mnist import CLASSES, read_idx

    root = tmp_path_factory.mktemp("fmnist")
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz", 8)
    for split, (lo, hi) in {"train": (0, 40), "val": (40, 60)}.items():
        for c in (0, 1, 7, 8):  # t-shirt, trouser, sneaker, bag: visually distinct
            (root / split / CLASSES[c]).mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[lo:hi]:
                Image.fromarray(images[i], mode="L").save(root / split / CLASSES[c] / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny ALaST run (classes a, b, c, its own validation folder) whose weights are the seeded initial
    ones (:func:`tests.helpers.make_run`); one per test module, which may export it."""
    root = tmp_path_factory.mktemp("run")
    data = make_image_folder(root / "train", classes=("a", "b", "c"))
    val = make_image_folder(root / "val", classes=("a", "b", "c"), per_class=3, seed=1)
    return make_run(data, root / "run", val_data=val)
