"""Fixtures of the device tests: a tiny ViT and its calibration (module-scoped: calibrating costs a few forward and
backward passes)."""
from __future__ import annotations

import pytest

from edge_alast.device.calibration import calibrate
from tests.helpers import TINY, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("vit")


@pytest.fixture(scope="module")
def cal(model):
    return calibrate(model, img_size=TINY["img_size"])
