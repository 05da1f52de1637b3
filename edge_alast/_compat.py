"""Import-time fixes for the environments edge-alast runs in.

Import this module before anything imports timm (``edge_alast/__init__.py`` does).

* No network at run time: weights come from local files, so Hugging Face hub look-ups are switched off.
* timm imports torchvision. PyPI's torchvision wheels for x86_64 are CUDA builds; under a CPU build of torch their
  C extension does not load, and ``torchvision/_meta_registrations.py`` then fails at import with
  ``RuntimeError: operator torchvision::nms does not exist`` -- which makes ``import timm`` fail. edge-alast uses
  none of torchvision's compiled ops, so when (and only when) that failure happens we register the two op schemas
  that module attaches fake kernels to, and import again. On Jetson/Pi, where torchvision's wheels load, nothing
  is done.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Schemas as defined in torchvision/csrc/ops/nms.cpp; only these two get `torch.library.register_fake` at import.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment = None  # keeps the torch.library registration alive for the life of the process


def ensure_torchvision_importable() -> bool:
    """Import torchvision, registering missing op schemas if its C extension failed to load.

    Returns:
        True if the schemas had to be registered (a CUDA torchvision beside a CPU torch), False otherwise.
    """
    global _fragment
    try:
        import torchvision  # noqa: F401
        return False
    except ModuleNotFoundError:
        return False  # timm works without torchvision's feature-extraction helpers being importable
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-initialised package so the retry starts clean
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        _fragment.define(schema)
    importlib.import_module("torchvision")
    return True


ensure_torchvision_importable()
