"""Tests for device profiles: the shipped YAML files, validation errors, host detection and the CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner

from edge_alast.device import profiles as P
from edge_alast.cli.profiles import profiles as profiles_cli
from edge_alast.device.profiles import DeviceProfile, ProfileError, detect_host, list_profiles, load_profile, parse_profile

SHIPPED = {
    "jetson_agx_orin_64gb",
    "jetson_orin",
    "jetson_orin_nano_4gb",
    "jetson_orin_nano_8gb",
    "jetson_orin_nx_16gb",
    "laptop_cpu",
    "raspberry_pi_4_4gb",
    "raspberry_pi_5_8gb",
}


def _valid() -> dict:
    return {
        "name": "test_board",
        "description": "A board for tests.",
        "device": "cpu",
        "memory_ceiling_bytes": 2_000_000_000,
        "flops_per_second": {"fp32": 1.0e10},
        "fast_precisions": [],
        "threads": 4,
        "target_step_seconds": 60,
        "default_batch_size": 4,
        "default_precision": "fp32",
    }


def _write(tmp_path: Path, data, name: str = "board.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


# ================================================================================================================
# Shipped profiles
# ================================================================================================================


def test_list_profiles_is_the_shipped_set_sorted():
    names = list_profiles()
    assert names == sorted(names)
    assert set(names) == SHIPPED


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_loads_and_validates(name):
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name  # the file stem is the profile's name
    assert Path(profile.source).name == f"{name}.yaml"
    assert profile.memory_ceiling_bytes > 0
    assert profile.flops_per_second["fp32"] > 0
    assert profile.flop_ceiling("fp32") is not None  # every shipped profile budgets its steps
    data = yaml.safe_load(Path(profile.source).read_text())
    if "alias_of" not in data:
        assert "#" in Path(profile.source).read_text()  # figures carry their source in comments
        assert parse_profile(data, profile.source) == profile


def test_shipped_figures_are_the_cited_ones():
    assert 2.0e9 <= load_profile("jetson_orin_nano_4gb").memory_ceiling_bytes <= 2.2e9
    assert 5.0e9 <= load_profile("jetson_orin_nano_8gb").memory_ceiling_bytes <= 5.5e9
    assert load_profile("jetson_agx_orin_64gb").memory_ceiling_bytes == 58e9
    assert load_profile("raspberry_pi_4_4gb").memory_ceiling_bytes == 2.9e9
    assert load_profile("raspberry_pi_5_8gb").memory_ceiling_bytes == 6.2e9
    assert load_profile("laptop_cpu").memory_ceiling_bytes == 6 * 2**30
    for name in ("raspberry_pi_4_4gb", "raspberry_pi_5_8gb"):
        pi = load_profile(name)
        assert (pi.device, pi.fast_precisions, pi.threads, set(pi.flops_per_second)) == ("cpu", (), 4, {"fp32"})
    for name in ("jetson_orin_nano_4gb", "jetson_orin_nano_8gb", "jetson_orin_nx_16gb", "jetson_agx_orin_64gb"):
        jetson = load_profile(name)
        assert jetson.device == "cuda" and set(jetson.fast_precisions) == {"bf16", "fp16"}
    laptop = load_profile("laptop_cpu")
    assert (laptop.fast_precisions, laptop.default_precision) == ((), "auto")


SOURCE_TAG = re.compile(r"\[(spec|published|estimate|assumed|measured on [^\]]+)\]")


def _figure_sources(text: str) -> dict[str, str]:
    """Each figure line (memory ceiling, each FLOP/s) with its comment and the comment block right above it."""
    figures, above = {}, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped)
            continue
        key = re.match(r"^(memory_ceiling_bytes|  (?:fp32|bf16|fp16)):", line)
        if key:
            figures[key.group(1).strip()] = " ".join([*above, line])
        above = []
    return figures


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_figure_cites_its_source(name):
    text = Path(load_profile(name).source).read_text()
    if "alias_of" in yaml.safe_load(text):
        return
    assert "[team]" not in text  # no board measurement was ever made by this project
    figures = _figure_sources(text)
    assert set(figures) >= {"memory_ceiling_bytes", "fp32"}
    for key, context in figures.items():
        assert SOURCE_TAG.search(context), f"{name}: {key} cites no [spec]/[published]/[estimate]/[assumed]/[measured]"


def test_alias_resolves_to_its_target():
    alias, target = load_profile("jetson_orin"), load_profile("jetson_orin_nano_8gb")
    assert alias.alias_of == "jetson_orin_nano_8gb"
    assert alias.name == "jetson_orin"
    assert Path(alias.source).name == "jetson_orin.yaml"
    figures = ("device", "memory_ceiling_bytes", "flops_per_second", "fast_precisions", "target_step_seconds")
    assert all(getattr(alias, f) == getattr(target, f) for f in figures)
    assert target.alias_of is None


def test_load_profile_by_path(tmp_path):
    path = _write(tmp_path, _valid(), "mine.yml")
    for arg in (path, str(path)):
        profile = load_profile(arg)
        assert profile.name == "test_board"
        assert profile.source == str(path.resolve())


def test_unknown_name_lists_available():
    with pytest.raises(ProfileError) as err:
        load_profile("jetson_nope")
    message = str(err.value)
    assert "'jetson_nope'" in message
    assert all(name in message for name in SHIPPED | {"auto"})


def test_auto_name_detects_the_host():
    profile = load_profile("auto")
    assert profile.name == "auto" and profile.source == "detect_host"


def test_profiles_module_does_not_import_torch():
    # edge_alast/__init__.py and edge_alast/device/__init__.py import nothing heavy, so the package path counts.
    code = (
        "import sys\n"
        "import edge_alast.device.profiles as module\n"
        "module.list_profiles()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ================================================================================================================
# Validation
# ================================================================================================================


def _without(key):
    def edit(data):
        del data[key]

    return edit


def _set(key, value):
    def edit(data):
        data[key] = value

    return edit


INVALID = [
    ("missing-name", _without("name"), "name"),
    ("missing-device", _without("device"), "device"),
    ("missing-memory", _without("memory_ceiling_bytes"), "memory_ceiling_bytes"),
    ("missing-flops", _without("flops_per_second"), "flops_per_second"),
    ("missing-batch", _without("default_batch_size"), "default_batch_size"),
    ("name-not-str", _set("name", 3), "name"),
    ("memory-text", _set("memory_ceiling_bytes", "abc"), "memory_ceiling_bytes"),
    ("memory-negative", _set("memory_ceiling_bytes", -1), "memory_ceiling_bytes"),
    ("memory-zero", _set("memory_ceiling_bytes", 0), "memory_ceiling_bytes"),
    ("memory-bad-unit", _set("memory_ceiling_bytes", "2G"), "memory_ceiling_bytes"),
    ("memory-bool", _set("memory_ceiling_bytes", True), "memory_ceiling_bytes"),
    ("unknown-device", _set("device", "tpu"), "device"),
    ("flops-not-mapping", _set("flops_per_second", 1e10), "flops_per_second"),
    ("flops-unknown-precision", _set("flops_per_second", {"fp32": 1e10, "int8": 4e10}), "flops_per_second"),
    ("flops-no-fp32", _set("flops_per_second", {"fp16": 1e10}), "flops_per_second"),
    ("flops-negative", _set("flops_per_second", {"fp32": -1.0}), "flops_per_second.fp32"),
    ("flops-text", _set("flops_per_second", {"fp32": "fast"}), "flops_per_second.fp32"),
    ("fast-unknown", _set("fast_precisions", ["fp8"]), "fast_precisions"),
    ("fast-fp32", _set("fast_precisions", ["fp32"]), "fast_precisions"),
    ("fast-not-list", _set("fast_precisions", "bf16"), "fast_precisions"),
    ("fast-repeated", _set("fast_precisions", ["bf16", "bf16"]), "fast_precisions"),
    ("threads-zero", _set("threads", 0), "threads"),
    ("threads-float", _set("threads", 2.5), "threads"),
    ("compile-text", _set("compile", "yes"), "compile"),
    ("batch-text", _set("default_batch_size", "16"), "default_batch_size"),
    ("precision-unknown", _set("default_precision", "fp64"), "default_precision"),
    ("precision-not-fast", _set("default_precision", "bf16"), "default_precision"),
    ("target-negative", _set("target_step_seconds", -5), "target_step_seconds"),
    ("ceiling-and-target", _set("flop_ceiling_per_step", 1e12), "flop_ceiling_per_step"),
    ("extra-field", _set("gpu_cores", 1024), "gpu_cores"),
    ("source-set", _set("source", "/elsewhere.yaml"), "source"),
    ("alias-unknown", lambda d: d.clear() or d.update(name="a", description="b", alias_of="nope"), "alias_of"),
    ("alias-of-alias", lambda d: d.clear() or d.update(name="a", description="b", alias_of="jetson_orin"), "alias_of"),
    ("alias-extra", lambda d: d.update(alias_of="jetson_orin_nano_8gb"), "alias_of"),
    ("alias-no-description", lambda d: d.clear() or d.update(name="a", alias_of="laptop_cpu"), "description"),
]


@pytest.mark.parametrize("edit, field", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_field_names_file_and_field(tmp_path, edit, field):
    data = _valid()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert message.startswith(f"profile {path.resolve()}:")
    assert f"'{field}'" in message


def test_error_message_format():
    with pytest.raises(ProfileError, match=r"^profile /x/y\.yaml: field 'memory_ceiling_bytes' must be a positive "
                                           r"integer .*\(got 'abc'\)$"):
        parse_profile({**_valid(), "memory_ceiling_bytes": "abc"}, "/x/y.yaml")


@pytest.mark.parametrize(
    "text, what",
    [("name: [unclosed\n", "invalid YAML"), ("- a\n- b\n", "mapping"), ("", "mapping"), ("just text\n", "mapping")],
)
def test_bad_yaml_names_file(tmp_path, text, what):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError, match=what) as err:
        load_profile(path)
    assert str(path.resolve()) in str(err.value)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(ProfileError, match="file not found") as err:
        load_profile(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(err.value)


@pytest.mark.parametrize(
    "written, expected",
    [
        (5_000_000_000, 5_000_000_000),
        ("4096", 4096),
        ("5GB", 5_000_000_000),
        ("5 GB", 5_000_000_000),
        ("2.1GiB", int(2.1 * 2**30)),
        ("512MiB", 512 * 2**20),
        ("512mib", 512 * 2**20),
        ("6.2GB", 6_200_000_000),
        ("1.5kB", 1500),
        ("1TiB", 2**40),
    ],
)
def test_memory_size_strings(written, expected):
    assert parse_profile({**_valid(), "memory_ceiling_bytes": written}, "t").memory_ceiling_bytes == expected


def test_yaml11_exponent_strings_are_numbers(tmp_path):
    # PyYAML reads `1.2e12` (no exponent sign) as a string; it must still count as a number.
    text = yaml.safe_dump(_valid()).replace("fp32: 10000000000.0", "fp32: 1.2e12")
    assert "1.2e12" in text
    assert load_profile(_write(tmp_path, text)).flops_per_second["fp32"] == 1.2e12


def test_alias_file_outside_the_package(tmp_path):
    path = _write(tmp_path, {"name": "my_board", "description": "Mine.", "alias_of": "raspberry_pi_5_8gb"})
    profile = load_profile(path)
    assert (profile.name, profile.alias_of, profile.source) == ("my_board", "raspberry_pi_5_8gb", str(path.resolve()))
    assert profile.flops_per_second == load_profile("raspberry_pi_5_8gb").flops_per_second


# ================================================================================================================
# FLOP ceiling
# ================================================================================================================


def test_flop_ceiling_from_target_step_seconds():
    data = {**_valid(), "flops_per_second": {"fp32": 1.2e10, "fp16": 3.0e10}, "fast_precisions": ["fp16"]}
    profile = parse_profile(data, "t")
    assert profile.flop_ceiling("fp32") == 60 * 1.2e10
    assert profile.flop_ceiling("fp16") == 60 * 3.0e10
    assert profile.flop_ceiling("bf16") == 60 * 1.2e10  # no bf16 rate: falls back to fp32's


def test_flop_ceiling_fixed_or_absent():
    fixed = {**_valid(), "flop_ceiling_per_step": 5e11}
    del fixed["target_step_seconds"]
    assert parse_profile(fixed, "t").flop_ceiling("fp16") == 5e11
    neither = _valid()
    del neither["target_step_seconds"]
    assert parse_profile(neither, "t").flop_ceiling("fp32") is None


def test_flop_ceiling_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        parse_profile(_valid(), "t").flop_ceiling("auto")


def test_shipped_jetson_ceiling_by_hand():
    nano = load_profile("jetson_orin_nano_8gb")
    assert nano.flop_ceiling("bf16") == nano.target_step_seconds * nano.flops_per_second["bf16"] == 8 * 2.4e12


def test_profile_is_frozen_and_to_dict_is_plain():
    profile = load_profile("laptop_cpu")
    with pytest.raises(AttributeError):
        profile.threads = 8
    data = profile.to_dict()
    assert isinstance(data["fast_precisions"], list) and isinstance(data["flops_per_second"], dict)
    assert data["source"] == profile.source and data["alias_of"] is None
    json.dumps(data)


# ================================================================================================================
# Host detection
# ================================================================================================================

CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 {extra}\n\nprocessor\t: 1\n"


def _detect(tmp_path, flags: str = "", cgroup: str | None = None, **kwargs) -> DeviceProfile:
    cpuinfo = _write(tmp_path, CPUINFO.format(extra=flags), "cpuinfo")
    cgroup_path = tmp_path / "memory.max"
    if cgroup is not None:
        cgroup_path.write_text(cgroup)
    kwargs.setdefault("probe_cuda", False)
    return detect_host(
        cpuinfo_path=cpuinfo, cgroup_memory_path=cgroup_path, tegra_release_path=tmp_path / "no_tegra", **kwargs
    )


@pytest.mark.parametrize(
    "flags, fast, per_core",
    [
        ("", (), 8e9),
        ("avx512f", (), 16e9),
        ("avx512f avx512_bf16", ("bf16",), 16e9),
        ("avx512f amx_tile amx_bf16", ("bf16",), 16e9),
    ],
)
def test_detect_host_cpu_flags(tmp_path, flags, fast, per_core):
    profile = _detect(tmp_path, flags)
    assert profile.device == "cpu"
    assert profile.fast_precisions == fast
    assert profile.flops_per_second == {"fp32": profile.threads * per_core}
    assert profile.default_precision == "auto"
    assert "estimate" in profile.description
    assert profile.flop_ceiling("fp32") is None


@pytest.mark.parametrize("cgroup", [None, "max\n", str(10 * psutil.virtual_memory().total) + "\n"])
def test_detect_host_memory_without_a_smaller_cgroup_limit(tmp_path, cgroup):
    profile = _detect(tmp_path, cgroup=cgroup)
    assert profile.memory_ceiling_bytes == int(psutil.virtual_memory().total * 0.85)


def test_detect_host_memory_from_smaller_cgroup_limit(tmp_path):
    profile = _detect(tmp_path, cgroup=f"{2**30}\n")
    assert profile.memory_ceiling_bytes == int(2**30 * 0.85)
    assert "cgroup" in profile.description


@pytest.mark.parametrize(
    "capability, fast, default",
    [((8, 7), ("bf16", "fp16"), "bf16"), ((7, 5), ("fp16",), "fp16"), ((6, 1), (), "fp32")],
)
def test_detect_host_cuda(tmp_path, monkeypatch, capability, fast, default):
    monkeypatch.setattr(P.host, "cuda_device", lambda: ("Fake GPU", 16 * 2**30, 8, capability))
    profile = _detect(tmp_path, probe_cuda=True)
    assert profile.device == "cuda"
    assert profile.memory_ceiling_bytes == int(16 * 2**30 * 0.85)
    assert profile.fast_precisions == fast
    assert profile.default_precision == default
    assert profile.flops_per_second["fp32"] == 8 * P._CUDA_FLOPS_PER_SM


def test_detect_host_jetson_caps_gpu_memory_with_ram(tmp_path, monkeypatch):
    monkeypatch.setattr(P.host, "cuda_device", lambda: ("Orin", 10**15, 8, (8, 7)))
    tegra = _write(tmp_path, "# R36 (release), REVISION: 4.0\n", "nv_tegra_release")
    cpuinfo = _write(tmp_path, "", "cpuinfo")
    profile = detect_host(cpuinfo_path=cpuinfo, cgroup_memory_path=tmp_path / "none", tegra_release_path=tegra)
    assert profile.memory_ceiling_bytes == int(psutil.virtual_memory().total * 0.85)
    assert "Jetson" in profile.description


def test_detect_host_on_this_machine():
    profile = detect_host(probe_cuda=False)
    memory = psutil.virtual_memory().total
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    assert profile.memory_ceiling_bytes == int(memory * 0.85)
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False)
    assert profile.threads == (min(logical, physical) if physical else logical)
    if Path("/proc/cpuinfo").exists():
        words = set(Path("/proc/cpuinfo").read_text().split())
        assert ("bf16" in profile.fast_precisions) == bool(words & {"avx512_bf16", "amx_bf16"})


def test_detect_host_with_cuda_probe_runs():
    import torch

    profile = detect_host()
    if torch.cuda.is_available():  # the GPU is described: its memory (capped by the RAM on a Jetson), its SMs
        props = torch.cuda.get_device_properties(0)
        assert profile.device == "cuda" and profile.memory_ceiling_bytes <= int(props.total_memory * 0.85)
        assert profile.flops_per_second["fp32"] == props.multi_processor_count * P._CUDA_FLOPS_PER_SM
    else:  # no CUDA device: the probe finds nothing and the host is described as without it
        assert profile == detect_host(probe_cuda=False) and profile.device == "cpu"


# ================================================================================================================
# CLI
# ================================================================================================================


def test_cli_list():
    result = CliRunner().invoke(profiles_cli, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == list_profiles() + ["auto"]
    assert any(line.startswith("jetson_orin ") and "alias of jetson_orin_nano_8gb" in line for line in lines)


def test_cli_show_yaml_is_a_valid_profile(tmp_path):
    runner = CliRunner()
    result = runner.invoke(profiles_cli, ["show", "jetson_orin"])
    assert result.exit_code == 0, result.output
    assert "alias of jetson_orin_nano_8gb" in result.output
    copy = _write(tmp_path, result.output, "copy.yaml")
    assert runner.invoke(profiles_cli, ["validate", str(copy)]).output.strip() == "ok"
    shipped, copied = load_profile("jetson_orin").to_dict(), load_profile(copy).to_dict()
    for meta in ("source", "alias_of"):
        shipped.pop(meta), copied.pop(meta)
    assert copied == shipped


def test_cli_show_json_by_path():
    path = str(Path(load_profile("raspberry_pi_4_4gb").source))
    result = CliRunner().invoke(profiles_cli, ["show", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == load_profile("raspberry_pi_4_4gb").to_dict()


def test_cli_show_unknown_name_exits_2():
    result = CliRunner().invoke(profiles_cli, ["show", "nope"])
    assert result.exit_code == 2
    assert "available" in result.output


def test_cli_validate(tmp_path):
    runner = CliRunner()
    good = runner.invoke(profiles_cli, ["validate", str(_write(tmp_path, _valid(), "good.yaml"))])
    assert (good.exit_code, good.output.strip()) == (0, "ok")
    bad_path = _write(tmp_path, {**_valid(), "device": "tpu"}, "bad.yaml")
    bad = runner.invoke(profiles_cli, ["validate", str(bad_path)])
    assert bad.exit_code == 2
    assert "'device'" in bad.output and "bad.yaml" in bad.output
    syntax = runner.invoke(profiles_cli, ["validate", str(_write(tmp_path, "a: [", "syntax.yaml"))])
    assert syntax.exit_code == 2 and "invalid YAML" in syntax.output


def test_a_second_checkout_reads_its_own_profiles_not_the_installed_ones(tmp_path):
    """An editable install maps edge_alast.device_profiles to the checkout it came from; code run from another
    checkout (a git worktree running a benchmark) must read the profiles beside it."""
    import shutil

    repo = Path(P.__file__).resolve().parents[2]
    shutil.copytree(repo / "edge_alast", tmp_path / "edge_alast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "device_profiles", tmp_path / "device_profiles")
    out = subprocess.run([sys.executable, "-c", "from edge_alast.device.profiles import _profiles_root; "
                          "print(_profiles_root())"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "device_profiles")
