"""Compiled steps (``--compile auto|on|off``): each transformer block's ``forward`` through ``torch.compile``.

What is compiled is the block's own computation, one block at a time, never the training step or the whole model:

* ALaST's plan changes every step (keep ratios, frozen blocks, recomputation). Its per-block hook stays in eager
  Python (:class:`~edge_alast.alast.patch.AlastHandle` runs it outside ``forward``, and its ``attn.qkv`` hook is
  ``torch.compiler.disable``'d), so no keep ratio ever becomes a guard that recompiles.
* Every block of a ViT shares one ``Block.forward`` code object, so one compiled graph serves all twelve; what
  recompiles is a new token count (the first change marks the token dimension dynamic, which covers every later
  count: ``token_multiple`` is not needed for it), a block frozen this step (``requires_grad`` is a guard), and
  evaluation (no grad). The graphs made are counted and reported; ``torch._dynamo``'s recompile limit bounds them
  (past it a block runs eagerly, as without compile).
* Activation recomputation wraps the compiled forward in ``torch.utils.checkpoint`` as it wraps the eager one.

:meth:`CompiledBlocks.remove` restores the eager forwards: the stage removes it when it closes, before the final
model is saved and exported, so ONNX export and checkpoints see timm's modules unchanged.

``auto`` compiles where the device profile says it pays off (its ``compile`` field, set from
``tools/bench_compile.py``'s measurement on that hardware) and not elsewhere: on the 2-core x86 host the project is
measured on, compiling the blocks cost more seconds than it saved over a 200-step run (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..alast.patch import AlastHandle

COMPILE_MODES = ("auto", "on", "off")
# Graphs per code object before dynamo falls back to eager for it: training (trainable, frozen above a trainable
# block, all frozen), static then dynamic token counts, and evaluation, with room to spare.
RECOMPILE_LIMIT = 16


def resolve_compile(mode: str, profile_compile: bool | None) -> tuple[bool, str]:
    """Whether blocks are compiled, and why (for the start event and the summary). ``profile_compile``: the
    device profile's ``compile`` field (None: no profile, or not measured on it)."""
    if mode == "off":
        return False, "--compile off"
    if mode == "on":
        return True, "--compile on"
    if profile_compile:
        return True, "auto: the device profile's compile: true (measured to pay off there)"
    if profile_compile is False:
        return False, "auto: the device profile's compile: false (measured not to pay off there)"
    return False, "auto: not measured for this device (no profile, or its compile field unset), so eager"


def missing_toolchain(device: str) -> str | None:
    """What ``torch.compile`` lacks to compile for ``device`` here, in words (None: nothing). Inductor builds C++
    kernels for the CPU with the system's compiler, and Triton kernels for CUDA."""
    import importlib.util
    import os
    import shutil

    if device == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton (the CUDA kernels' compiler) is not installed"
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(n) for n in names):
        return f"no C++ compiler ({', '.join(names)}) is on PATH for its CPU kernels (e.g. apt-get install g++)"
    return None


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class CompiledBlocks:
    """Each of ``model.blocks`` with its ``forward`` replaced by a compiled one; :meth:`remove` restores them."""

    def __init__(self, model: nn.Module, handle: AlastHandle | None = None):
        import torch._dynamo
        if handle is not None:
            handle.eager_hooks()
        self.blocks = list(model.blocks)
        self._own: list[Any] = []
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
        self._graphs_before = _graphs()
        for blk in self.blocks:
            own = vars(blk).get("forward")  # an instance forward of its own (e.g. recomputation's), if any
            self._own.append(own)
            blk.forward = torch.compile(own if own is not None else blk.forward, dynamic=None)

    @property
    def graphs(self) -> int:
        """Graphs compiled since these blocks were (all compiled code in the process counts)."""
        return _graphs() - self._graphs_before

    def remove(self) -> None:
        for blk, own in zip(self.blocks, self._own):
            if own is None:
                vars(blk).pop("forward", None)
            else:
                blk.forward = own
        self.blocks, self._own = [], []
