"""Precision: ``auto`` follows a measurement, not CPU flags alone; the autocast context per precision."""
import torch

import edge_alast.device.precision as precision


def test_auto_precision_follows_measurement_not_flags(monkeypatch):
    assert isinstance(precision.cpu_bf16_is_faster.__wrapped__((64, 64, 64), 2), bool)  # the real probe runs
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: set())
    assert precision.resolve_precision("auto", "cpu") == "fp32"  # no bf16 instructions: never probed
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_autocast_per_precision():
    x = torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with precision.autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
