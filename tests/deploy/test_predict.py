"""predict --provider: the execution provider chosen from what onnxruntime offers."""
from __future__ import annotations

import pytest

from edge_alast.deploy.predict import choose_provider
from edge_alast.errors import ConfigError

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("available, has_gpu, chosen, warns", [
    ([TRT, CUDA, CPU], True, TRT, False),
    ([CUDA, CPU], True, CUDA, False),
    ([CPU], True, CPU, True),
    ([CPU], False, CPU, False),
])
def test_auto_takes_the_best_present_and_warns_when_it_falls_back_from_a_gpu(available, has_gpu, chosen, warns):
    provider, warning = choose_provider("auto", available, has_gpu=has_gpu)
    assert provider == chosen
    assert (warning is not None) is warns
    if warns:
        assert "running on the CPU" in warning


def test_a_named_provider_that_is_missing_is_a_config_error_naming_the_build():
    with pytest.raises(ConfigError, match="--provider cuda: .*CPUExecutionProvider"):
        choose_provider("cuda", [CPU])
    assert choose_provider("cuda", [CUDA, CPU]) == (CUDA, None)
    assert choose_provider("cpu", [CUDA, CPU]) == (CPU, None)
