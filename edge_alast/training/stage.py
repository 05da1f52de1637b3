"""Stages of a run: what trains the model between two transitions.

A :class:`Stage` owns its patch handle, policy, optimizer, LR schedule and FLOP counter (and, in Light-PEFT's
estimation stage, the importance recorder). Most methods have one stage. Light-PEFT has two: ``estimate`` (LoRA plus
masks on every block with every token) and ``finetune`` on the pruned model; :func:`next_stage` is the transition
the training loop calls at the step the first stage ends. Checkpoints hold ``stage.state_dict()``, named state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.flops import StepFlopCounter
from ..adapters.lightpeft import ImportanceRecorder, apply_pruning, plan_pruning
from ..device.memory import trim_heap
from ..methods import ESTIMATE, FINETUNE
from ..alast.patch import AlastHandle, apply_patch
from ..alast.policy import AlastPolicy, StaticPolicy, make_policy
from .compiled import CompiledBlocks
from .run import Run
from ..model.names import is_embedding
from ..model.trainable import TrainableSet


@dataclass
class Stage:
    """What trains the model from ``first_step`` to ``end_step`` (see module docstring).

    Attributes:
        name: ``estimate`` or ``finetune`` (:mod:`edge_alast.methods`).
        trainable: What can ever train in this stage (the model's parameters change at a pruning).
        end_step: The step at which the next stage begins (None: this stage runs to the end).
        recorder: Light-PEFT's importance recorder (estimation stage only).
        pruning: What Light-PEFT's pruning kept (the stage after it), else None.
        compiled: The blocks' compiled forwards (``--compile``), removed with the patch when the stage closes.
    """

    name: str
    trainable: TrainableSet
    handle: AlastHandle
    policy: AlastPolicy | StaticPolicy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    flop_counter: StepFlopCounter
    end_step: int | None = None
    recorder: ImportanceRecorder | None = None
    pruning: dict | None = None
    compiled: CompiledBlocks | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "policy": self.policy.state_dict(), "pruning": self.pruning,
                "estimation": self.recorder.state_dict() if self.recorder is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.load_state_dict(state["policy"])
        if self.recorder is not None:
            self.recorder.load_state_dict(state["estimation"])

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def close(self) -> None:
        """Remove the patch and the importance recorder's hooks; the model computes as timm's again."""
        if self.recorder is not None:
            self.recorder.stop()
        self.handle.remove()  # first: it restores the forwards it wrapped (recomputation) to the compiled ones
        if self.compiled is not None:
            self.compiled.remove()

    def free(self) -> None:
        """Drop the optimizer's state (moments), e.g. before an export on a small device."""
        self.optimizer.state.clear()
        self.optimizer.param_groups.clear()


def first_stage(run: Run) -> Stage:
    """The stage a run starts in."""
    name = run.spec.stages[0]
    end = run.config.light_peft.estimation_steps if name == ESTIMATE else None
    recorder = ImportanceRecorder(run.model, end) if name == ESTIMATE else None
    return _build(run, name, run.trainable, run.flop_counter, first_step=0, end_step=end, recorder=recorder)


def next_stage(run: Run, stage: Stage, pruning: dict | None = None) -> Stage:
    """Light-PEFT's transition: prune ``run.model`` by the estimates (or by ``pruning``, a decision read from a
    checkpoint) and return the fine-tuning stage of the smaller model, starting at ``stage.end_step``."""
    if pruning is None:
        pruning = plan_pruning(run.model, run.config.light_peft, stage.recorder)
    stage.close()
    apply_pruning(run.model, pruning)
    trainable = TrainableSet.for_method(run.model, run.spec, train_embeddings=run.config.train_embeddings,
                                        freeze_below=run.config.freeze_below)
    trainable.apply(run.model)
    new = _build(run, FINETUNE, trainable, StepFlopCounter(run.model, trainable), first_step=stage.end_step,
                 pruning=pruning)
    trim_heap()
    return new


def pruning_summary(model: nn.Module, pruning: dict, base_params: int) -> dict:
    """What Light-PEFT's pruning kept, for the prune event and the summary (``model``: the pruned model)."""
    ranks = {n: len(r) for n, r in pruning["adapters"].items()}
    return {"heads_per_block": [len(h) for h in pruning["heads"]],
            "ffn_units_per_block": [len(u) for u in pruning["units"]],
            "adapters_kept": len(ranks), "lora_ranks_kept": sum(ranks.values()), "adapter_ranks": ranks,
            "base_params_kept": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "base_params_original": base_params}


def _build(run: Run, name: str, trainable: TrainableSet, flop_counter: StepFlopCounter, *, first_step: int,
           end_step: int | None = None, recorder: ImportanceRecorder | None = None,
           pruning: dict | None = None) -> Stage:
    config = run.config
    policy = make_policy(run.spec, name, run.depth, run.alast, lr=config.lr)
    handle = apply_patch(run.model, token_multiple=config.token_multiple, trainable=trainable)
    compiled = CompiledBlocks(run.model, handle) if run.compile else None
    # One optimizer over every parameter that can ever train, created once per stage: freezing leaves grads None
    # so the optimizer skips those parameters and keeps their state (never edits param groups).
    params = list(trainable.parameters(run.model))
    decays = [p.ndim > 1 and not is_embedding(n) for n, p in params]
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls([{"params": [p for (_, p), d in zip(params, decays) if d], "weight_decay": config.weight_decay},
                         {"params": [p for (_, p), d in zip(params, decays) if not d], "weight_decay": 0.0}],
                        lr=config.lr)
    factor = lr_factor(config, run.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s + first_step))
    return Stage(name=name, trainable=trainable, handle=handle, policy=policy, optimizer=optimizer,
                 scheduler=scheduler, flop_counter=flop_counter, end_step=end_step, recorder=recorder,
                 pruning=pruning, compiled=compiled)


def lr_factor(config, total_steps: int):
    """The LR multiplier at a global step: linear warm-up, then constant or cosine to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "cosine":
            t = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return factor
