"""Host probes: cgroup v1/v2 limits of this process's own cgroup, board model strings, profile matching."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edge_alast.device import host
from edge_alast.device.profiles import match_host


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_limit_of_the_process_own_group(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/system.slice/edge.service\n")
    write(tmp_path / "v2/system.slice/edge.service/memory.max", "2147483648\n")
    write(tmp_path / "v2/system.slice/edge.service/memory.current", "1073741824\n")
    found = host.cgroup_memory(proc, tmp_path / "v2", tmp_path / "v1")
    assert found == {"version": 2, "limit_bytes": 2**31, "usage_bytes": 2**30,
                     "path": str(tmp_path / "v2/system.slice/edge.service")}


def test_cgroup_v1_limit_and_unlimited_v1_reads_as_none(tmp_path):
    proc = write(tmp_path / "cgroup", "12:memory:/edge\n3:cpu,cpuacct:/edge\n")
    write(tmp_path / "v1/edge/memory.limit_in_bytes", str(900 * 2**20))
    write(tmp_path / "v1/edge/memory.usage_in_bytes", str(100 * 2**20))
    found = host.cgroup_memory(proc, tmp_path / "v2", tmp_path / "v1")
    assert found["version"] == 1 and found["limit_bytes"] == 900 * 2**20 and found["usage_bytes"] == 100 * 2**20
    write(tmp_path / "v1/edge/memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    write(tmp_path / "v1/memory.limit_in_bytes", "9223372036854771712")
    assert host.cgroup_memory(proc, tmp_path / "v2", tmp_path / "v1") is None


def test_usable_memory_is_capped_by_the_cgroup_headroom():
    cgroup = {"version": 1, "limit_bytes": 3 * 2**30, "usage_bytes": 2**30, "path": "/x"}
    info = host.memory_available(cgroup)
    assert info["usable_bytes"] == min(info["available_bytes"], 2 * 2**30)


def test_board_model_reads_device_tree_and_l4t(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    tegra = write(tmp_path / "nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 1\n")
    assert host.board_model(model, tegra) == {"model": "NVIDIA Jetson Orin Nano Developer Kit",
                                              "l4t": "R36 (release), REVISION: 4.3, GCID: 1"}
    assert host.board_model(tmp_path / "none", tmp_path / "none") == {"model": None, "l4t": None}


def test_match_host_picks_the_variant_whose_ceiling_fits_the_ram():
    assert match_host("x86_64", None, 16 * 2**30).name == "laptop_cpu"
    assert match_host("aarch64", "Raspberry Pi 5 Model B Rev 1.0", 8 * 10**9).name == "raspberry_pi_5_8gb"
    assert match_host("aarch64", "Raspberry Pi 4 Model B Rev 1.4", 4 * 10**9).name == "raspberry_pi_4_4gb"
    jetson = "NVIDIA Jetson Orin Nano Developer Kit"
    assert match_host("aarch64", jetson, 8 * 10**9).name == "jetson_orin_nano_8gb"
    assert match_host("aarch64", jetson, 4 * 10**9).name == "jetson_orin_nano_4gb"
    assert match_host("aarch64", "NVIDIA Jetson AGX Orin", 64 * 10**9).name == "jetson_agx_orin_64gb"
    assert match_host("aarch64", None, 8 * 10**9) is None


def test_a_limit_on_an_ancestor_group_binds_and_the_least_headroom_wins(tmp_path):
    """A limit set on a parent slice holds the groups below it; v1, and v2 mounted at a hybrid host's unified/."""
    proc = write(tmp_path / "cgroup", "4:memory:/slice/app\n0::/slice/app\n")
    write(tmp_path / "v1/slice/app/memory.limit_in_bytes", "9223372036854771712")  # the own group: no limit
    write(tmp_path / "v1/slice/memory.limit_in_bytes", str(3 * 2**30))
    write(tmp_path / "v1/slice/memory.usage_in_bytes", str(2**30))
    found = host.cgroup_memory(proc, (tmp_path / "v2", tmp_path / "v2/unified"), tmp_path / "v1")
    assert found == {"version": 1, "limit_bytes": 3 * 2**30, "usage_bytes": 2**30, "path": str(tmp_path / "v1/slice")}
    # a tighter v2 limit on the hybrid mount: 2 GiB with 1.5 GiB used leaves less than v1's 2 GiB of headroom
    write(tmp_path / "v2/unified/slice/app/memory.max", str(2 * 2**30))
    write(tmp_path / "v2/unified/slice/app/memory.current", str(3 * 2**29))
    found = host.cgroup_memory(proc, (tmp_path / "v2", tmp_path / "v2/unified"), tmp_path / "v1")
    assert found["version"] == 2 and found["path"] == str(tmp_path / "v2/unified/slice/app")
    write(tmp_path / "v2/unified/slice/app/memory.max", "max\n")  # v2's "no limit": the v1 ancestor binds again
    assert host.cgroup_memory(proc, (tmp_path / "v2", tmp_path / "v2/unified"), tmp_path / "v1")["version"] == 1


def test_cpu_wait_sums_the_run_queue_wait_of_every_live_thread(tmp_path):
    """schedstat: CPU ns, run-queue wait ns, timeslices. A thread gone between listing and reading is skipped."""
    write(tmp_path / "101" / "schedstat", "5000000000 1500000000 40\n")
    write(tmp_path / "102" / "schedstat", "7 250000000 3\n")
    (tmp_path / "103").mkdir()  # exited: no schedstat left
    write(tmp_path / "104" / "schedstat", "not numbers\n")
    assert host.cpu_wait_seconds(tmp_path) == pytest.approx(1.75)
    assert host.cpu_wait_seconds(tmp_path / "absent") is None  # not Linux
    (tmp_path / "none").mkdir()
    write(tmp_path / "none" / "1" / "other", "")
    assert host.cpu_wait_seconds(tmp_path / "none") is None  # a kernel without schedstat


RIVAL = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
print("ready", flush=True)
end = time.perf_counter() + 60
while time.perf_counter() < end:
    pass
"""
CONTENDED = """
import os, subprocess, sys, time
from edge_alast.device.host import cpu_wait_seconds
core = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {core})
rival = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(core)], stdout=subprocess.PIPE, text=True)
assert rival.stdout.readline().strip() == "ready"
before, end = cpu_wait_seconds(), time.perf_counter() + 1.0
while time.perf_counter() < end:  # busy for 1 s of wall time on the core the rival spins on
    pass
print(cpu_wait_seconds() - before)
rival.kill()
"""


@pytest.mark.skipif(host.cpu_wait_seconds() is None or not hasattr(host.os, "sched_setaffinity"),
                    reason="no schedstat or no CPU affinity on this host")
def test_a_rival_process_on_the_same_core_shows_as_cpu_wait():
    """Two busy processes on one core share it, so about half of a busy second is spent waiting for it: the
    reading a benchmark uses to name a contended run."""
    proc = subprocess.run([sys.executable, "-c", CONTENDED, RIVAL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) > 0.25  # the scheduler's fair share: ~0.5 s
