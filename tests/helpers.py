"""What the tests call or parametrise over: tiny timm models, tiny image folders, tiny run configs and finished runs,
damaged image bytes, and a torch-free run of a deploy command.

Fixtures (requested by name) live in ``conftest.py``; builders that take arguments, and the tables tests
parametrise over at collection time, live here, so that no test module imports another.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge_alast import _compat  # noqa: F401  (before timm)
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parent.parent

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)
# The same tiny ViT built by name (``create_model(TINY_MODEL, img_size=32, num_classes=..., **TINY_ARGS)``).
TINY_MODEL = "vit_tiny_patch16_224"
TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}

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


# ---------------------------------------------------------------------------------------------- images
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


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth gradients, a few blobs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 150 + 60], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def jpeg_bytes(h: int = 96, w: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(h, w)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def damaged_inside(data: bytes) -> bytes:
    """A JPEG whose header parses and which ends with EOI, but whose Huffman table libjpeg rejects on decode."""
    i = data.index(b"\xff\xc4")
    return data[:i + 5] + b"\xff" * 16 + data[i + 21:]


# ---------------------------------------------------------------------------------------------- runs
def tiny_config(data, out, **kw):
    """A TrainConfig for the tiny ViT on ``data``: 3 steps of 4 images, no export."""
    from edge_alast.config import TrainConfig

    base = dict(data=str(data), out=str(out), model=TINY_MODEL, model_args=dict(TINY_ARGS),
                img_size=32, steps=3, batch_size=4, lr=1e-3, val_fraction=0.25, export=False)
    base.update(kw)
    return TrainConfig(**base)


def profile_file(tmp_path: Path, ceiling_bytes: int) -> str:
    """``laptop_cpu`` with another memory ceiling, written as ``tiny_board.yaml``."""
    import yaml

    data = yaml.safe_load((REPO / "device_profiles" / "laptop_cpu.yaml").read_text())
    data.update(name="tiny_board", memory_ceiling_bytes=int(ceiling_bytes))
    path = tmp_path / "tiny_board.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def make_run(data, out, val_data=None, steps=2, seed=0) -> Path:
    """A finished tiny ALaST run folder whose ``model.safetensors`` holds the seeded initial weights (so a test can
    rebuild them), not the tuned ones. Nothing is exported: a ``model.onnx`` of the tuned weights would not match
    them."""
    from edge_alast.model.build import create_model
    from edge_alast.runfolder import save_model
    from edge_alast.training.trainer import train

    config = tiny_config(data, out, val_data=str(val_data) if val_data else None, steps=steps, seed=seed)
    summary = train(config).summary
    torch.manual_seed(seed)
    save_model(create_model(TINY_MODEL, num_classes=len(summary["classes"]), img_size=32, **TINY_ARGS), out)
    return Path(out)


# ---------------------------------------------------------------------------------------------- planning
PLAN_BASELINE = 100 * 2**20  # a fixed process baseline keeps the planner tests independent of this process's RSS


def trainable_for(model, method: str):
    """What ``method`` trains in ``model`` (:class:`~edge_alast.model.trainable.TrainableSet`)."""
    from edge_alast.methods import METHODS
    from edge_alast.model.trainable import TrainableSet

    return TrainableSet.for_method(model, METHODS[method])


def cost_for(model, cal, method: str = "alast", **kw):
    """The cost model of ``method`` on a tiny model at the tiny image size and :data:`PLAN_BASELINE`."""
    from edge_alast.device.costmodel import CostModel

    return CostModel(model, cal, img_size=TINY["img_size"], trainable=trainable_for(model, method),
                     baseline_bytes=PLAN_BASELINE, **kw)


def run_cli_without_torch(command: str, args: list[str]):
    """Run an ``edge_alast.cli.deploy`` command in a fresh interpreter; fails there if torch or timm got imported."""
    code = ("import sys\n"
            f"from edge_alast.cli.deploy import {command} as cmd\n"
            "try:\n"
            f"    cmd.main({args!r}, standalone_mode=False)\n"
            "finally:\n"
            "    assert 'torch' not in sys.modules, 'torch was imported'\n"
            "    assert 'timm' not in sys.modules, 'timm was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
