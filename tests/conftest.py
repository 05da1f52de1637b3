"""Shared fixtures: tiny in-file timm models, tiny image folders, and the real assets when present.

Tests that need real weights or images are marked ``assets``. They skip when the assets are absent, except with
``EDGE_ALAST_REQUIRE_ASSETS=1`` (set by .ci/run), where a missing asset fails the test instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_alast import _compat  # noqa: F401  (before timm)
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parent.parent
SHARED_WEIGHTS = REPO.parent / "shared" / "assets" / "vit_small_patch14_dinov2.imgfocus.safetensors"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)

# name -> constructor of a tiny model; covers prefix tokens (dist, registers), LayerScale, qk-norm, avg pooling.
TINY_MODELS = {
    "vit": lambda: VisionTransformer(**TINY),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
    "vit_layerscale": lambda: VisionTransformer(**TINY, init_values=0.1),
    "vit_qknorm_reg": lambda: VisionTransformer(**TINY, qk_norm=True, reg_tokens=2, init_values=0.1),
    "vit_avgpool": lambda: VisionTransformer(**{**TINY, "global_pool": "avg"}),
}


def tiny_model(kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY_MODELS[kind]()


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


def make_image_folder(root: Path, classes=("a", "b"), per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    """Synthetic ImageFolder: class k images are noise around a class-specific colour (learnable)."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = np.array([255 * (k % 2), 255 * ((k // 2) % 2), 128], dtype=np.float64)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def run_cli_without_torch(command: str, args: list[str]):
    """Run an ``edge_alast.cli.deploy`` command in a fresh interpreter; fails there if torch or timm got imported."""
    import subprocess
    import sys

    code = ("import sys\n"
            f"from edge_alast.cli.deploy import {command} as cmd\n"
            "try:\n"
            f"    cmd.main({args!r}, standalone_mode=False)\n"
            "finally:\n"
            "    assert 'torch' not in sys.modules, 'torch was imported'\n"
            "    assert 'timm' not in sys.modules, 'timm was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
