"""Reading what a run recorded: ``metrics.jsonl`` lines and steady-state timing. Torch-free (used by the ONNX
Runtime trainer, the report and the benchmarks)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

# The first steps of a run pay for allocator growth and first-touch pages: up to this many are left out of
# steady-state figures (never more than a fifth of the run).
WARMUP_STEPS = 5


def steady(values: Sequence[float]) -> list[float]:
    """``values`` (per step, in order) without the warm-up steps."""
    warm = min(WARMUP_STEPS, len(values) // 5)
    return list(values[warm:] or values)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every JSON object of a ``metrics.jsonl``; a line cut by a power loss is skipped; no file reads as empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
