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
