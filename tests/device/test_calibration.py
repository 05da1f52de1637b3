"""Calibration: per-token saved bytes of a block by kind, positive and monotone in batch and tokens."""
from __future__ import annotations


def test_calibration_positive_and_monotone(cal):
    for kind in ("weight", "both", "input"):
        c = cal.saved[kind]
        assert c.per_token > 0
        assert c(2, 17) > c(1, 17) > 0 and c(1, 17) > c(1, 9)
    assert cal.saved["both"].per_token >= cal.saved["input"].per_token  # trainable stores more than frozen
    assert cal.saved["input"].per_token > cal.recompute_per_token > 0  # recomputed: only the input
    assert cal.forward.per_token > 0 and cal.backward(4, 17) > 0
