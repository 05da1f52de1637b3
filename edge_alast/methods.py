"""The fine-tuning methods as data: one frozen :class:`MethodSpec` per method, looked up by name.

Code asks the record what a method needs (which block parameters train, whether ALaST budgets decide the steps,
LoRA adapters, Light-PEFT masks and stages, how the planner costs it); nothing switches on method names.
Torch-free, so the CLI and the config can read the table without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

# What trains inside the blocks when the plan lets a block train.
BLOCKS_ALL, BLOCKS_ADAPTERS, BLOCKS_NONE = "all", "adapters", "none"
# Stages of a run, in order. "estimate": Light-PEFT's early estimation (adapters and masks on every block with every
# token); "finetune": the method's own training (after Light-PEFT's pruning, on the smaller model).
ESTIMATE, FINETUNE = "estimate", "finetune"


@dataclass(frozen=True)
class MethodSpec:
    """What a fine-tuning method is made of.

    Attributes:
        name: The ``--method`` value.
        blocks: What trains in a block that trains: every parameter (``all``), the LoRA adapters and Light-PEFT masks
            (``adapters``; the blocks' own weights are frozen), or nothing (``none``).
        alast: ALaST budgets decide tokens and trainable blocks in the fine-tuning stage; otherwise every block
            trains with every token (or none, for ``blocks="none"``).
        lora: LoRA adapters wrap each block's Linears.
        light_peft: Light-PEFT: an estimation stage with masks, then pruning, then fine-tuning.
        embeddings: The patch/position embeddings always train (otherwise only with ``--train-embeddings``).
        default_lr: The learning rate when ``--lr`` is not given. Fine-tuning every weight of a pretrained model
            (full, alast) wants a small one (3e-5 was the best of 3e-5/1e-4/3e-4 for full on Fashion-MNIST); a
            freshly initialised head or zero-initialised LoRA B barely moves at it (the head reached 0.34-0.36 in
            300 steps at 3e-5, and a 2-round alast-lora fleet stayed at chance), so those methods default to 1e-3.
        default_anneal_last: ``alast.anneal_last`` when not given, with the ``reference`` update (the other updates
            default to 0). For ``alast``, 0.2: the time-to-accuracy protocol's rule chose the anneal remedy over
            every ALaST update and baseline (docs/benchmarks.md: Fashion-MNIST, 112 px, 3 seeds; runs that drop
            tokens to their last step plateau 1.8-6 points under full, annealed runs level with it). Not measured with
            adapters, so they keep 0.
        summary: One line for ``--help``.
    """

    name: str
    blocks: str
    alast: bool = False
    lora: bool = False
    light_peft: bool = False
    embeddings: bool = False
    default_lr: float = 3e-5
    default_anneal_last: float = 0.0
    summary: str = ""

    @property
    def stages(self) -> tuple[str, ...]:
        return (ESTIMATE, FINETUNE) if self.light_peft else (FINETUNE,)

    def uses_alast(self, stage: str) -> bool:
        """Whether ALaST's policy runs in ``stage`` (Light-PEFT estimates with every block and token)."""
        return self.alast and stage == FINETUNE

    @property
    def plan_kind(self) -> str:
        """How the planner and the memory guard cost the method: ``alast`` (budgets; K blocks train), ``full``
        (every block trains with every token) or ``head`` (no block trains). Light-PEFT is planned for its
        estimation stage, its costliest (every adapter, every token, the unpruned model)."""
        if self.blocks == BLOCKS_NONE:
            return "head"
        return "alast" if self.uses_alast(self.stages[0]) else "full"


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("alast", BLOCKS_ALL, alast=True, default_anneal_last=0.2,
               summary="ALaST budgets: tokens and trainable blocks per step"),
    MethodSpec("full", BLOCKS_ALL, embeddings=True, summary="every parameter, every token, every step"),
    MethodSpec("head", BLOCKS_NONE, default_lr=1e-3, summary="the classifier head only"),
    MethodSpec("lora", BLOCKS_ADAPTERS, lora=True, default_lr=1e-3, summary="LoRA adapters on every block"),
    MethodSpec("alast-lora", BLOCKS_ADAPTERS, alast=True, lora=True, default_lr=1e-3,
               summary="LoRA adapters under ALaST budgets"),
    MethodSpec("light-peft", BLOCKS_ADAPTERS, lora=True, light_peft=True, default_lr=1e-3,
               summary="Light-PEFT: estimate, prune heads/FFN units/adapters/ranks, fine-tune LoRA"),
    MethodSpec("light-peft+alast", BLOCKS_ADAPTERS, alast=True, lora=True, light_peft=True, default_lr=1e-3,
               summary="Light-PEFT, fine-tuned under ALaST budgets after pruning"),
)}


def method_spec(name: str) -> MethodSpec:
    """The record of ``name``; a ``KeyError`` names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None
