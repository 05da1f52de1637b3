"""edge-alast: on-device fine-tuning of timm Vision Transformers with ALaST adaptive layer selection.

Python API for daemons::

    from edge_alast import TrainConfig, train
    result = train(TrainConfig(data="imgs/", out="run/", weights="vit_s.safetensors"), on_event=print)

Importing the package imports nothing heavy: torch and timm load on first use of these names, so deployment-side
commands (ONNX prediction) run where torch is not installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": ".config",
    "AlastConfig": ".config",
    "LoraConfig": ".config",
    "LightPeftConfig": ".config",
    "METHODS": ".methods",
    "MethodSpec": ".methods",
    "AlastPolicy": ".alast.policy",
    "StepPlan": ".alast.policy",
    "Run": ".training.run",
    "setup_run": ".training.run",
    "TrainResult": ".training.trainer",
    "train": ".training.trainer",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'edge_alast' has no attribute {name!r}")
