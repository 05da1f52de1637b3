"""Process memory readings: RSS follows touched pages, per-interval peaks reset where Linux allows, and the heap
can be trimmed on glibc."""
import platform
import sys

import numpy as np
import pytest

from edge_alast.device.memory import PeakTracker, peak_rss_bytes, rss_bytes, trim_heap

MIB = 2**20
BLOCK = 64 * MIB


def test_rss_counts_touched_pages_and_the_peak_holds_them():
    before = rss_bytes()
    block = np.ones(BLOCK, dtype=np.uint8)  # every page written: resident
    assert rss_bytes() - before >= 0.9 * BLOCK
    # the kernel's high-water mark (synced in batches of page faults, so not to the byte) includes the block
    assert peak_rss_bytes() >= before + 0.9 * BLOCK
    del block


def test_an_intervals_peak_is_its_own_and_the_lifetime_peak_keeps_every_interval():
    tracker = PeakTracker()
    tracker.interval_peak()  # from here on, each reading is one interval's own
    start = rss_bytes()
    block = np.ones(BLOCK, dtype=np.uint8)
    del block  # freed (a large block is unmapped at once): the interval's peak remembers it, the RSS does not
    first = tracker.interval_peak()
    assert first >= start + 0.9 * BLOCK
    if tracker._resettable:  # Linux with /proc/self/clear_refs: the next interval starts from the current RSS
        assert tracker.interval_peak() < first - 0.5 * BLOCK
    assert tracker.lifetime_peak() >= first


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="malloc_trim is glibc's")
def test_trim_heap_calls_the_allocators_release_on_glibc():
    assert trim_heap() is True


def test_cuda_cap_is_ceiling_less_rss_on_unified_memory_and_the_ceiling_on_a_discrete_gpu(monkeypatch):
    """No GPU here: torch.cuda's two calls are faked, the arithmetic and what reaches the allocator are real."""
    import types

    import torch

    from edge_alast.device import memory
    from edge_alast.training import run as run_module

    set_to = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=8 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: set_to.append((f, d)))
    monkeypatch.setattr(memory, "rss_bytes", lambda: 1 * 2**30)
    assert memory.cap_cuda_memory(5 * 2**30, unified=True) == 4 * 2**30  # Jetson: CPU and GPU share the ceiling
    assert memory.cap_cuda_memory(5 * 2**30, unified=False) == 5 * 2**30
    assert memory.cap_cuda_memory(2**29, unified=True) == 0  # RSS already above: the smallest fraction torch takes
    assert set_to == [(0.5, 0), (0.625, 0), (1e-3, 0)]
    # setup_run's planning step reads the board: a Jetson (L4T release present) gets the unified cap
    monkeypatch.setattr("edge_alast.device.host.board_model", lambda: {"model": "Orin Nano", "l4t": "R36"})
    assert run_module._cap_cuda_allocator(5 * 2**30) == 4 * 2**30
    monkeypatch.setattr("edge_alast.device.host.board_model", lambda: {"model": None, "l4t": None})
    assert run_module._cap_cuda_allocator(5 * 2**30) == 5 * 2**30
