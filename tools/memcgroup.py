"""A memory cgroup of its own for a process and its children: how the tests and tools/bench_ceiling.py hold a
training run to a board's memory, as the board's kernel would (the OOM killer, not a Python check).

cgroup v1 (``memory.limit_in_bytes``) or v2 (``memory.max``); creating one needs root.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A memory cgroup of its own (v1 or v2), limited to ``limit`` bytes, for the processes started in it."""

    def __init__(self, limit: int):
        name = f"edge-alast-test-{uuid.uuid4().hex[:8]}"
        if (V1 / "memory.limit_in_bytes").exists():
            self.path, self.v2 = V1 / name, False
        elif (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.controllers").read_text():
            self.path, self.v2 = V2 / name, True
        else:
            raise OSError("no cgroup memory controller mounted")
        self.path.mkdir()
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if not self.v2 and (self.path / "memory.memsw.limit_in_bytes").exists():
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no escape into swap

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        if self.v2:
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0))
        control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
