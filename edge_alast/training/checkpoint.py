"""Power-loss-safe training checkpoints.

Each checkpoint is ``checkpoint-<step>.pt`` (``torch.save`` of a dict of tensors and plain values, loadable with
``weights_only=True``) plus ``checkpoint-<step>.sha256``. Both are written atomically (temp file, fsync,
``os.replace``, fsync of the folder), the checksum after the checkpoint, so a checkpoint without a matching
checksum is one that never finished. The newest two are kept; loading walks from the newest to the oldest and
takes the first that verifies, so a damaged newest checkpoint falls back to the one before.

With a device key (:mod:`edge_alast.integrity`) the sidecar holds an HMAC-SHA256 signature instead of the plain
sha256, and a checkpoint whose sidecar is unsigned or does not match is refused (IntegrityError, exit 2) rather
than passed over: it was written without the key.

Before writing, the free space is checked against the state's tensor bytes; a disk that fills up anyway is a
DiskFullError (exit 6). Either way the checkpoints already written are untouched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, atomic_write_bytes
from ..integrity import check_seal, seal

KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``run_dir``, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: what its file will take, within a few percent."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], key: bytes | None = None) -> Path:
    """Write the checkpoint for ``step`` and its checksum (signed with ``key`` when given); keep the newest
    :data:`KEEP`.

    Streams ``torch.save`` straight to the temp file (no second in-memory copy of the state on a small device).
    On failure the temp file is removed and every earlier checkpoint is untouched.

    Raises:
        DiskFullError: less free space than the state's tensors need, or the write ran out of it.
    """
    run_dir = Path(run_dir)
    path = run_dir / f"checkpoint-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f), needed=state_bytes(state), what=f"checkpoint at step {step}")
    atomic_write_bytes(path.with_suffix(".sha256"), (seal(path, key) + "\n").encode())
    for _, old in checkpoints(run_dir)[KEEP:]:
        old.with_suffix(".sha256").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def verify(path: Path, key: bytes | None = None) -> str | None:
    """None if ``path`` matches its checksum file, else the reason it does not.

    Raises:
        IntegrityError: with ``key``, a sidecar that is not its signature of ``path``; without, a signed sidecar.
    """
    sidecar = path.with_suffix(".sha256")
    try:
        expected = sidecar.read_text().strip()
    except OSError:
        return "no checksum file (the write did not finish)"
    return check_seal(path, expected, key)


def load_latest(run_dir: str | os.PathLike, key: bytes | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint that verifies (under ``key`` when given) and loads, and a note for each newer one
    that was passed over.

    Raises:
        IntegrityError: see :func:`verify`.
    """
    notes = []
    for step, path in checkpoints(run_dir):
        reason = verify(path, key)
        if reason is None:
            try:
                return torch.load(path, map_location="cpu", weights_only=True), notes
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is passed over
                reason = f"unreadable: {type(e).__name__}: {e}"
        notes.append(f"{path.name}: {reason}; falling back to an older checkpoint")
    return None, notes
