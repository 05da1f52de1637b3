"""Typed run configuration: the single source of truth the CLI and the Python API both fill."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .lightpeft import LightPeftConfig
from .lora import LoraConfig
from .policy import AlastConfig

METHODS = ("alast", "full", "head", "lora", "alast-lora", "light-peft", "light-peft+alast")
ALAST_METHODS = ("alast", "alast-lora", "light-peft+alast")
LORA_METHODS = ("lora", "alast-lora", "light-peft", "light-peft+alast")
LIGHT_PEFT_METHODS = ("light-peft", "light-peft+alast")
SECTIONS = {"alast": AlastConfig, "lora": LoraConfig, "light_peft": LightPeftConfig}

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adam")


def plan_kind(method: str) -> str:
    """How the planner and memory guard see a method: ``alast`` (budgets, K of the blocks train), ``full`` (every
    block trains with every token) or ``head``. Light-PEFT plans for its estimation stage, which trains every
    adapter with every token on the unpruned model (its costliest stage)."""
    if method == "head":
        return "head"
    return "alast" if method in ("alast", "alast-lora") else "full"


def _check_numbers(obj, name) -> None:
    """Numeric fields hold numbers: a float field takes a numeric string (YAML 1.1 reads ``1e-3``, without a dot,
    as a string); anything else is a :class:`ConfigError` naming the field (``name(field)``)."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type).replace(" ", "")
        if value is None or kind not in ("float", "float|None", "int", "int|None"):
            continue
        if kind.startswith("float") and isinstance(value, str):
            try:
                setattr(obj, f.name, float(value))
                continue
            except ValueError:
                pass
        wrong = isinstance(value, bool) or not isinstance(value, int if kind.startswith("int") else (int, float))
        if wrong:
            raise ConfigError(f"{name(f.name)}: must be {'an integer' if kind.startswith('int') else 'a number'}, "
                              f"got {value!r}")


def _section(key: str, value, source: str):
    """A run-file section (``alast``, ``lora``, ``light_peft``) as its dataclass; unknown keys are an error."""
    cls = SECTIONS[key]
    if isinstance(value, cls):
        return value
    value = value or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {key} keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    section = cls(**value)
    _check_numbers(section, lambda field_name: f"{source}: {key}.{field_name}")
    return section


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names mirror the ``edge-alast train`` options.

    ``steps`` and ``epochs`` are alternatives: with neither, one epoch is run. ``batch_size`` and ``precision``
    default to the device profile's. ``eval_batch_size`` defaults to the training batch size: evaluation then never
    needs more memory than a training step (a larger eval batch set the peak RSS of head-only runs).
    """

    data: str
    out: str
    model: str = "vit_small_patch14_dinov2"
    model_args: dict = field(default_factory=dict)
    weights: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.2
    img_size: int = 224
    profile: str | None = None
    device: str | None = None
    method: str = "alast"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float = 3e-5
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup_steps: int = 0
    precision: str | None = None
    seed: int = 0
    train_embeddings: bool = False
    freeze_below: int = 0
    recompute_blocks: list = field(default_factory=list)
    token_multiple: int = 1
    trim_memory: bool = True
    max_bad_fraction: float = 0.5
    checkpoint_every_seconds: float | None = 300.0
    checkpoint_every_steps: int | None = None
    resume: bool | None = None
    export: bool = True
    alast: AlastConfig = field(default_factory=AlastConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    light_peft: LightPeftConfig = field(default_factory=LightPeftConfig)

    def __post_init__(self):
        for key in SECTIONS:  # the Python API may pass the sections as plain mappings, as a run file does
            setattr(self, key, _section(key, getattr(self, key), "config"))
        _check_numbers(self, lambda field_name: f"--{field_name.replace('_', '-')}")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device is not None and self.device not in ("cpu", "cuda"):
            raise bad("device", f"must be cpu or cuda, got {self.device!r}")
        if self.steps is not None and self.epochs is not None:
            raise bad("steps", "give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise bad("steps", f"must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise bad("epochs", f"must be > 0, got {self.epochs}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise bad("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        for name in ("img_size", "token_multiple"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.freeze_below < 0:
            raise bad("freeze_below", f"must be >= 0, got {self.freeze_below}")
        if any(not isinstance(i, int) or i < 0 for i in self.recompute_blocks):
            raise bad("recompute_blocks", f"must be block indices >= 0, got {self.recompute_blocks}")
        if self.batch_size is not None and self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.checkpoint_every_seconds is not None and self.checkpoint_every_seconds <= 0:
            raise bad("checkpoint_every_seconds", f"must be > 0, got {self.checkpoint_every_seconds}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise bad("checkpoint_every_steps", f"must be >= 1, got {self.checkpoint_every_steps}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise bad("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.method in LORA_METHODS:
            self.lora.validate()
        if self.method in LIGHT_PEFT_METHODS:
            self.light_peft.validate()
            if self.steps is not None and self.steps <= self.light_peft.estimation_steps:
                raise bad("steps", f"must exceed --estimation-steps ({self.light_peft.estimation_steps}) for "
                                   f"{self.method}: steps count estimation and fine-tuning, got {self.steps}")

    # Fields that may change between an interrupted run and its resumption without changing the result.
    RESUME_FREE = ("resume", "checkpoint_every_seconds", "checkpoint_every_steps", "out")

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with this config to be resumed by it."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUME_FREE}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping (a YAML run file); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        data = dict(data)
        missing = [n for n in ("data", "out") if n not in data]
        if missing:
            raise ConfigError(f"{source}: missing required keys {', '.join(missing)}")
        for key in SECTIONS:
            data[key] = _section(key, data.get(key), source)
        return cls(**data)
