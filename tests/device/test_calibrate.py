"""Tests for ``edge_alast.device.calibrate`` and ``edge-alast profiles calibrate``: the written profile validates and
tags every figure, usable memory follows fake cgroup files, and bad --out values exit 2. Measured
rates are never asserted (timing is not a test)."""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner

from edge_alast.cli.profiles import profiles as profiles_cli
from edge_alast.device import calibrate as C
from edge_alast.device.profiles import load_profile
from edge_alast.errors import ConfigError

MEASURED = "[measured on this host,"
DEFAULT = "[default]"


def _measurement(**changes) -> C.HostMeasurement:
    rates = {"fp32": C.KernelRates(linear=1.1e11, attention=6.0e10, block=1.0e11),
             "bf16": C.KernelRates(linear=4.0e11, attention=9.0e10, block=3.0e11)}
    values = dict(date="2026-01-02", device="cpu", hardware="Test CPU, 2 CPUs usable by this process, x86_64",
                  torch_version="2.13.0", threads=2, batch_size=16, seconds=4.0, rates=rates,
                  fast_precisions=("bf16",), memory_bytes=8 * 2**30, memory_note="8.00 GiB of RAM available",
                  baseline_rss_bytes=450 * 2**20, skipped={"fp16": C._CPU_FP16})
    values.update(changes)
    return C.HostMeasurement(**values)


def _figure_lines(text: str) -> dict[str, str]:
    """Each top-level field and flops_per_second entry, mapped to its line (comments and description left out)."""
    return {match.group(1): line for line in text.splitlines()
            if (match := re.match(r"^(?:  )?([a-z0-9_]+):", line))}


# ================================================================================================================
# The written profile
# ================================================================================================================


def test_rendered_profile_validates_with_the_shipped_fields(tmp_path):
    path = tmp_path / "my_board.yaml"
    C.write_profile(path, C.render_profile(_measurement(), "my_board"))
    profile = load_profile(path)
    assert (profile.name, profile.device, profile.threads, profile.default_batch_size) == ("my_board", "cpu", 2, 16)
    assert profile.flops_per_second == {"fp32": 1.0e11, "bf16": 3.0e11}  # the block rates
    assert profile.fast_precisions == ("bf16",)
    assert profile.memory_ceiling_bytes == int(8 * 2**30 * 0.85)
    assert profile.default_precision == "auto" and profile.target_step_seconds == 20
    assert set(yaml.safe_load(path.read_text())) == {
        "name", "description", "device", "memory_ceiling_bytes", "flops_per_second", "fast_precisions", "threads",
        "target_step_seconds", "default_batch_size", "default_precision"}


def test_every_figure_says_where_it_comes_from(tmp_path):
    text = C.render_profile(_measurement(), "my_board")
    lines = _figure_lines(text)
    measured = ("memory_ceiling_bytes", "fp32", "bf16", "fast_precisions", "threads")
    defaults = ("target_step_seconds", "default_batch_size", "default_precision")
    for key in measured:
        assert f"# {MEASURED} 2026-01-02]" in lines[key], lines[key]
    for key in defaults:
        assert f"# {DEFAULT}" in lines[key], lines[key]
    assert "matmuls 4.000e+11, attention 9.000e+10; 3.00x fp32" in lines["bf16"]
    prose = re.sub(r"\n *# ", " ", text)  # comments unwrapped
    assert "450 MiB" in prose and "8.00 GiB of RAM available" in prose  # the baseline is reported, not subtracted
    assert "fp16 not timed" in prose
    assert "[team]" not in text


@pytest.mark.parametrize("load, warned", [(None, False), (1.9, False), (4.5, True)])
def test_a_busy_host_is_named_in_the_file_and_warned_about(load, warned):
    m = _measurement(load_average=load, cpus=2)
    prose = re.sub(r"\n *# ", " ", C.render_profile(m, "b"))
    assert ("load average" in prose) == (load is not None)
    assert load is None or f"load average {load:.2f} on 2 CPUs" in prose
    assert any(line.startswith("warning:") for line in C.summarise(m)) == warned


def test_cuda_measurement_keeps_default_threads(tmp_path):
    rates = {p: C.KernelRates(linear=2e13, attention=1e13, block=1.8e13) for p in ("fp32", "bf16", "fp16")}
    m = _measurement(device="cuda", threads=None, rates=rates, fast_precisions=("bf16", "fp16"), skipped={},
                     batch_size=32)
    path = tmp_path / "gpu.yaml"
    C.write_profile(path, C.render_profile(m, "gpu"))
    profile = load_profile(path)
    assert (profile.device, profile.threads, profile.target_step_seconds) == ("cuda", None, 8)
    assert "# [default]" in _figure_lines(path.read_text())["threads"]


def test_write_profile_keeps_no_file_that_does_not_validate(tmp_path):
    path = tmp_path / "broken.yaml"
    text = C.render_profile(_measurement(), "broken").replace("device: cpu", "device: tpu")
    with pytest.raises(C.CalibrationError, match="'device'"):
        C.write_profile(path, text)
    assert not path.exists()


def test_block_kernels_count_the_vit_s_block_flops():
    linear, attention = C._block_kernels(1, torch.float32, "cpu")
    rows, d = C.VIT_S_TOKENS, C.VIT_S_DIM
    assert C._counted_flops(linear) == 2 * rows * d * (3 * d + d + C.VIT_S_MLP + C.VIT_S_MLP)
    assert C._counted_flops(attention) == 4 * C.VIT_S_TOKENS**2 * d  # QK^T and AV over 6 heads of 64


def test_measure_host_cuda_without_a_device_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    with pytest.raises(ConfigError, match="cuda"):
        C.measure_host(device="cuda", seconds=0.01)


# ================================================================================================================
# Memory
# ================================================================================================================

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "limit, usage, binding",
    [(3 * 2**30, 2**30, True), (2**50, 2**30, False), (None, None, False)],
    ids=["cgroup-headroom-binds", "available-ram-binds", "no-cgroup"],
)
def test_usable_memory_reads_this_process_cgroup(tmp_path, limit, usage, binding):
    proc = _write(tmp_path / "cgroup", "0::/edge.service\n")
    if limit is not None:
        _write(tmp_path / "v2/edge.service/memory.max", f"{limit}\n")
        _write(tmp_path / "v2/edge.service/memory.current", f"{usage}\n")
    memory, note = C.usable_memory(proc, tmp_path / "v2", tmp_path / "v1")
    available = psutil.virtual_memory().available
    if binding:
        assert memory == limit - usage
        assert note.startswith("the cgroup v2 limit 3.00 GiB less its usage 1.00 GiB")
    else:
        assert abs(memory - available) < 0.1 * available  # MemAvailable moves a little between the two reads
        assert ("no cgroup memory limit" in note) == (limit is None)
    assert "read before torch was imported" not in note  # this test process has torch imported: it says so
    assert "incl. torch" in note


# ================================================================================================================
# CLI
# ================================================================================================================


def test_cli_calibrate_writes_a_valid_measured_profile(tmp_path):
    out = tmp_path / "this_host.yaml"
    result = CliRunner().invoke(profiles_cli, ["calibrate", "--out", str(out), "--seconds", "0.2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    profile = load_profile(out)  # validates
    assert profile.name == "this_host" and profile.device == "cpu"
    assert set(profile.fast_precisions) <= set(profile.flops_per_second) - {"fp32"}
    assert profile.memory_ceiling_bytes <= psutil.virtual_memory().total
    today = datetime.date.today().isoformat()
    assert f"# {MEASURED} {today}]" in _figure_lines(out.read_text())["fp32"]


@pytest.mark.parametrize(
    "out, why",
    [("no_such_folder/board.yaml", "does not exist"), ("board.txt", ".yaml"), (".", "")],
    ids=["missing-folder", "not-yaml", "a-folder"],
)
def test_cli_calibrate_unwritable_out_exits_2_naming_out(tmp_path, monkeypatch, out, why):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(C, "measure_host", lambda **kwargs: pytest.fail("measured before checking --out"))
    result = CliRunner().invoke(profiles_cli, ["calibrate", "--out", out])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and why in result.output
