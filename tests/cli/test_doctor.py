"""edge-alast doctor: problem detection on faked hosts, and the real command on this one."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_alast.cli import doctor as D
from edge_alast.cli.main import main

GiB = 2**30


def host(**over) -> dict:
    """Facts of a healthy x86_64 laptop; ``over`` replaces top-level entries."""
    facts = {
        "platform": {"machine": "x86_64", "system": "Linux", "release": "6.1", "python": "3.11.7", "executable": "py"},
        "board": {"model": None, "l4t": None},
        "cpu_model": "Some CPU",
        "cpu_threads": 4,
        "torch": {"version": "2.13.0+cpu", "cuda": None, "cuda_available": False, "threads": 4},
        "memory": {"total_bytes": 16 * GiB, "available_bytes": 12 * GiB, "cgroup": None, "usable_bytes": 12 * GiB},
        "onnxruntime": {"distributions": {"onnxruntime-training-cpu": "1.19.2"}, "version": "1.19.2",
                        "providers": ["CPUExecutionProvider"], "training": True},
        "versions": {"timm": "1.0.31", "onnx": "1.17.0", "flwr": None, "matplotlib": None},
        "allocators": {"tcmalloc": "/usr/lib/libtcmalloc_minimal.so.4", "jemalloc": None},
    }
    facts.update(over)
    return facts


def levels(findings, level):
    return {f.topic for f in findings if f.level == level}


def test_a_healthy_laptop_has_no_problem_and_matches_laptop_cpu():
    findings = D.diagnose(host())
    assert levels(findings, D.PROBLEM) == set()
    profile = next(f for f in findings if f.topic == "profile")
    assert profile.level == D.OK and "laptop_cpu" in profile.message


def test_a_cuda13_torch_without_libcudart_is_a_problem_with_the_cpu_wheel_as_fix():
    broken = {"version": "2.11.0", "error": "ImportError: libcudart.so.13: cannot open shared object file"}
    pi = host(platform={**host()["platform"], "machine": "aarch64"}, torch=broken,
              board={"model": "Raspberry Pi 5 Model B Rev 1.0", "l4t": None},
              onnxruntime={"distributions": {"onnxruntime": "1.23.2"}, "version": "1.23.2",
                           "providers": ["CPUExecutionProvider"], "training": False})
    findings = D.diagnose(pi)
    torch_finding = next(f for f in findings if f.topic == "torch")
    assert torch_finding.level == D.PROBLEM and "libcudart" in torch_finding.message
    assert "CPU wheel" in torch_finding.fix and "requirements/aarch64.txt" in torch_finding.fix
    # ORT training is absent on aarch64 by design: a note, not a problem
    assert next(f for f in findings if f.topic == "ort-training").level == D.NOTE
    assert "raspberry_pi_5_8gb" in next(f for f in findings if f.topic == "profile").message


def test_a_jetson_whose_torch_sees_no_gpu_is_a_problem():
    jetson = host(platform={**host()["platform"], "machine": "aarch64"},
                  board={"model": "NVIDIA Jetson Orin Nano Developer Kit", "l4t": "R36 (release), REVISION: 4.3"},
                  torch={"version": "2.10.0", "cuda": None, "cuda_available": False, "threads": 6},
                  memory={**host()["memory"], "total_bytes": 8 * 10**9})
    findings = D.diagnose(jetson)
    torch_finding = next(f for f in findings if f.topic == "torch")
    assert torch_finding.level == D.PROBLEM and "JetPack" in torch_finding.fix
    assert "jetson_orin_nano_8gb" in next(f for f in findings if f.topic == "profile").message


def test_both_onnxruntime_builds_installed_is_a_problem():
    both = {"distributions": {"onnxruntime": "1.23.2", "onnxruntime-training-cpu": "1.19.2"}, "version": "1.19.2",
            "providers": ["CPUExecutionProvider"], "training": True}
    assert "onnxruntime" in levels(D.diagnose(host(onnxruntime=both)), D.PROBLEM)


def test_missing_onnxruntime_and_onnx_are_problems_and_missing_tcmalloc_a_warning():
    facts = host(onnxruntime={"distributions": {}, "error": "ModuleNotFoundError: No module named 'onnxruntime'"},
                 versions={"timm": "1.0.31", "onnx": None}, allocators={"tcmalloc": None, "jemalloc": None})
    findings = D.diagnose(facts)
    assert {"onnxruntime", "onnx"} <= levels(findings, D.PROBLEM)
    assert "allocator" in levels(findings, D.WARNING)


def test_a_small_cgroup_limit_is_a_memory_problem():
    cgroup = {"version": 1, "limit_bytes": 900 * 2**20, "usage_bytes": 100 * 2**20, "path": "/x"}
    facts = host(memory={"total_bytes": 16 * GiB, "available_bytes": 12 * GiB, "cgroup": cgroup,
                         "usable_bytes": 800 * 2**20})
    finding = next(f for f in D.diagnose(facts) if f.topic == "memory")
    assert finding.level == D.PROBLEM and "cgroup v1" in finding.message


def test_old_python_is_a_problem():
    facts = host(platform={**host()["platform"], "python": "3.9.18"})
    assert "python" in levels(D.diagnose(facts), D.PROBLEM)


@pytest.mark.parametrize("problem", [False, True])
def test_the_command_exits_1_only_on_a_problem(monkeypatch, problem):
    facts = host(versions={"timm": "1.0.31", "onnx": None if problem else "1.17.0"})
    monkeypatch.setattr(D, "probe", lambda: facts)
    result = CliRunner().invoke(main, ["doctor", "--json"])
    report = json.loads(result.output)
    assert result.exit_code == (1 if problem else 0)
    assert report["ok"] is (not problem)


def test_doctor_on_this_host_reads_real_probes():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    report = json.loads(result.output)
    assert report["facts"]["platform"]["machine"]
    assert report["facts"]["torch"]["version"].startswith("2.")
    assert {f["topic"] for f in report["findings"]} >= {"host", "torch", "memory", "allocator", "onnxruntime",
                                                          "profile"}
