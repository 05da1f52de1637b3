"""Tests for ``edge_alast.device.calibrate`` and ``edge-alast profiles calibrate``: the written profile validates and
tags every figure, cgroup limits are read from fake /proc and /sys trees, and bad --out values exit 2. Measured
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
# cgroup memory limits
# ================================================================================================================

V2_MOUNT = "30 25 0:26 / {root}/unified rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNT = "35 25 0:32 {inside} {root}/memory rw,relatime - cgroup cgroup rw,memory\n"


def _cgroup_tree(tmp_path, cgroup: str, mounts: str, files: dict[str, str]) -> tuple[Path, Path]:
    """Fake /proc/self/cgroup and /proc/self/mountinfo, and limit files under tmp_path/sys (keys relative to it)."""
    for rel, text in files.items():
        path = tmp_path / "sys" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text(mounts.format(root=tmp_path / "sys", inside="/"))
    return tmp_path / "cgroup", tmp_path / "mountinfo"


@pytest.mark.parametrize(
    "cgroup, mounts, files, expected",
    [
        ("0::/user/app\n", V2_MOUNT, {"unified/user/app/memory.max": "2147483648\n"},
         ("unified/user/app/memory.max", 2**31)),
        ("0::/user/app\n", V2_MOUNT, {"unified/user/app/memory.max": "max\n"}, None),
        # A parent's limit binds when it is the tighter one.
        ("0::/user/app\n", V2_MOUNT, {"unified/user/app/memory.max": "max\n", "unified/user/memory.max": "1000\n"},
         ("unified/user/memory.max", 1000)),
        ("4:memory:/jobs/a\n0::/\n", V1_MOUNT, {"memory/jobs/a/memory.limit_in_bytes": "3000000000\n"},
         ("memory/jobs/a/memory.limit_in_bytes", 3_000_000_000)),
        # cgroup v1 "unlimited" is the largest page-aligned counter.
        ("4:memory:/jobs/a\n", V1_MOUNT, {"memory/jobs/a/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ("4:cpu,memory:/jobs/a\n", V1_MOUNT, {"memory/jobs/a/memory.limit_in_bytes": "5000\n"},
         ("memory/jobs/a/memory.limit_in_bytes", 5000)),
        ("0::/user/app\n", V2_MOUNT, {}, None),  # no limit files at all
        ("0::/user/app\n", "", {"unified/user/app/memory.max": "1000\n"}, None),  # hierarchy not mounted
    ],
    ids=["v2-limit", "v2-max", "v2-parent", "v1-limit", "v1-unlimited", "v1-shared-hierarchy", "no-files",
         "no-mount"],
)
def test_read_cgroup_memory_limit(tmp_path, cgroup, mounts, files, expected):
    proc_cgroup, mountinfo = _cgroup_tree(tmp_path, cgroup, mounts, files)
    found = C.read_cgroup_memory_limit(proc_cgroup, mountinfo)
    if expected is None:
        assert found is None
    else:
        limit_file, limit = expected
        assert found == (limit, tmp_path / "sys" / limit_file)


def test_read_cgroup_memory_limit_in_a_container_mount(tmp_path):
    # A container sees only its own part of the hierarchy: the mount's root is the cgroup's path.
    (tmp_path / "cgroup").write_text("4:memory:/docker/abc\n")
    (tmp_path / "mountinfo").write_text(V1_MOUNT.format(root=tmp_path / "sys", inside="/docker/abc"))
    limit_file = tmp_path / "sys" / "memory" / "memory.limit_in_bytes"
    limit_file.parent.mkdir(parents=True)
    limit_file.write_text("123456789\n")
    assert C.read_cgroup_memory_limit(tmp_path / "cgroup", tmp_path / "mountinfo") == (123456789, limit_file)


def test_read_cgroup_memory_limit_without_proc_files(tmp_path):
    assert C.read_cgroup_memory_limit(tmp_path / "absent", tmp_path / "absent_too") is None


def test_read_cgroup_memory_limit_on_this_host():
    found = C.read_cgroup_memory_limit()
    assert found is None or (found[0] > 0 and found[1].is_file())


@pytest.mark.parametrize("limit, binding", [(2**30, "cgroup"), (2**40, "available"), (None, "available")])
def test_usable_memory_is_the_tighter_bound(limit, binding):
    cgroup = (limit, Path("/sys/fs/cgroup/x/memory.max")) if limit else None
    memory, note = C._usable_host_memory(cgroup, 4 * 2**30)
    assert memory == (limit if binding == "cgroup" else 4 * 2**30)
    assert ("cgroup limit" in note) == (limit is not None)


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
