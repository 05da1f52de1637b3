"""Typed run configuration: the single source of truth the CLI, run files and the Python API all fill.

Torch-free. Each field's ``metadata`` says how a user reaches it: ``flag`` (the ``edge-alast train`` option the CLI
builds from it, with the field's default, choices and help) or none (a run-file key only), and what it may hold
(``choices``; ``min``/``max``, open with ``min_open``/``max_open``). Every number must be finite. The CLI, run files
and the fleet's run config all build a :class:`TrainConfig`, so they get the same checks. Errors name the field the
way the user wrote it: ``--lr`` for a flag, ``alast.b_min`` for a run-file key.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError
from .methods import METHODS

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adam")
DEVICES = ("cpu", "cuda")
SAMPLING_MODES = ("softmax", "topk")
# How ALaST's budgets move (see edge_alast.alast.policy.AlastPolicy): the paper's update, the co-authors' code's
# arithmetic (for reproduction), the scale-free relative one, or the baselines that keep per-block keep ratios fixed
# and train the same K blocks (static) or K drawn uniformly.
ALAST_UPDATES = ("reference", "coauthors", "relative", "static", "random")
# The update that reproduces the co-authors' training set-up as a whole: its run defaults to Adam without weight
# decay and trains the embeddings, as their code does (TrainConfig.__post_init__; explicit values win).
COAUTHORS = "coauthors"
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
AUGMENTATIONS = ("none", "flip", "rrc-flip")  # = edge_alast.data.images.AUGMENTATIONS (this module stays import-light)
ALLOCATORS = ("auto", "tcmalloc", "jemalloc", "glibc")  # = edge_alast.device.allocator.CHOICES
# = edge_alast.data.images.ImageLimits' defaults (that module imports PIL; this one stays import-light)
MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO = 40_000_000, 20.0
SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed

# PyYAML follows YAML 1.1, where ``1e-3`` and ``1.2e12`` (no dot / no sign in the exponent) are strings, not floats;
# numeric strings like them are accepted wherever a number is expected, so the natural spelling works.
_NUMBER_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def parse_number(value: Any) -> float | None:
    """``value`` as a finite float if it is a number or a numeric string (see ``_NUMBER_RE``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and _NUMBER_RE.match(value):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def option(default=dataclasses.MISSING, *, flag: str | None = None, help: str = "", choices=None,
           default_factory=dataclasses.MISSING, **extra):
    """A config field with what the CLI needs to offer it (``flag``, ``help``, ``choices``) and what it may hold
    (``min``, ``max``, ``min_open``, ``max_open``: see :func:`out_of_range`)."""
    metadata = {"flag": flag, "help": help, "choices": choices, **extra}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_name(cls, name: str, section: str | None = None) -> str:
    """How a user names ``cls.name``: its CLI flag, or its run-file key (``section.name``)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}.get(name, {})
    if meta.get("flag"):
        return meta["flag"].split("/")[0]  # a switch by its "on" spelling: --export, not --export/--no-export
    return f"{section}.{name}" if section else name


def out_of_range(value, metadata) -> str | None:
    """Why ``value`` is outside the field's ``min``/``max`` (``min_open``/``max_open``: the bound itself is out),
    or None; None values are not checked (they mean "not set")."""
    lo, hi = metadata.get("min"), metadata.get("max")
    if value is None or (lo is None and hi is None):
        return None
    lo_open, hi_open = metadata.get("min_open", False), metadata.get("max_open", False)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if not (below or above) and value == value:  # NaN compares false: out of any range
        return None
    lo, hi = (_bound(b) for b in (lo, hi))
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {lo}, got {value!r}"
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {hi}, got {value!r}"
    return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {value!r}"


def _bound(bound) -> str | None:
    """A bound as a user writes it: 0 for 0.0, 2**63-1 in full."""
    return None if bound is None else str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _check_numbers(obj, name: Callable[[str], str]) -> None:
    """Numeric fields hold numbers: a float field takes a numeric string and must be finite (``--lr inf``, a
    ``nan`` interval); anything else is a :class:`ConfigError` naming the field (``name(field)``)."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type).replace(" ", "")
        if value is None or kind not in ("float", "float|None", "int", "int|None"):
            continue
        if kind.startswith("float") and isinstance(value, str) and parse_number(value) is not None:
            setattr(obj, f.name, parse_number(value))
            continue
        wrong = isinstance(value, bool) or not isinstance(value, int if kind.startswith("int") else (int, float))
        if wrong:
            raise ConfigError(f"{name(f.name)}: must be {'an integer' if kind.startswith('int') else 'a number'}, "
                              f"got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name(f.name)}: must be a finite number, got {value!r}")


def _check_ranges(obj, name: Callable[[str], str]) -> None:
    """Every field with ``min``/``max`` metadata within them; a :class:`ConfigError` naming the first that is not."""
    for f in dataclasses.fields(obj):
        why = out_of_range(getattr(obj, f.name), f.metadata)
        if why:
            raise ConfigError(f"{name(f.name)}: {why}")


class _Section:
    """Shared by the run-file sections: number coercion and errors that name the key as the user wrote it."""

    SECTION = ""
    # What a checkpoint written before a key existed ran with, where that is not the key's default now.
    PREDATES: dict[str, Any] = {}

    def __post_init__(self):
        _check_numbers(self, self.name)

    def name(self, key: str) -> str:
        return field_name(type(self), key, self.SECTION)

    def bad(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.name(key)}: {why}, got {getattr(self, key)!r}")


@dataclass
class AlastConfig(_Section):
    """ALaST policy settings (run-file key ``alast``). See :class:`edge_alast.alast.policy.AlastPolicy` for the source of
    each default."""

    SECTION = "alast"
    PREDATES = {"anneal_last": 0.0}  # checkpoints from before annealing became alast's default never annealed

    b_init: float = option(0.9, flag="--alast-b-init",
                           help="Initial budget (keep ratio) of every block. --alast-b-init 1 --alast-b-min 1 keeps "
                                "every token: layer freezing only (an ablation).")
    b_min: float = option(0.5, flag="--alast-b-min", help="Lowest budget (keep ratio) a block can fall to.")
    alpha: float | None = None
    k_trainable: int | None = option(None, flag="--alast-k-trainable",
                                     help="Blocks trained per step (default: ceil(3/4 of the depth), 9 of 12).")
    freeze: bool = option(True, flag="--alast-freeze/--no-alast-freeze",
                          help="Freeze all but K blocks each step; --no-alast-freeze trains every block every step "
                               "(token dropping only, an ablation).")
    anneal_last: float | None = option(None, flag="--alast-anneal-last",
                                       help="Share of the run's last steps over which every block's keep ratio "
                                            "rises linearly to 1, so training ends on the all-token view evaluation "
                                            "uses (this project's remedy, not the paper's; 0: off). Default: the "
                                            "method's for the reference update (0.2 for alast, chosen by the "
                                            "time-to-accuracy rule, docs/benchmarks.md), else 0.")
    sampling: str = "softmax"
    temperature: float = 1.0
    seed: int | None = option(None, min=0, max=SEED_MAX)  # layer sampling's seed; default: the run's --seed
    update: str = option("reference", flag="--alast-update", choices=ALAST_UPDATES,
                         help="How budgets move: reference (paper Eq. 6), coauthors (the co-authors' code, for "
                              "reproduction: docs/alast.md), relative (scale-free, from each block's class-token "
                              "change relative to the token), or the baselines static and random (fixed keep "
                              "ratios: --alast-from RUN_DIR).")
    spread: float = 1.5
    smoothing: float = 0.9
    keep_ratios: list | None = None
    trainable_blocks: list | None = None
    from_run: str | None = option(None, flag="--alast-from",
                                  help="static/random baselines: take per-block keep ratios (their means) and the "
                                       "K most-trained blocks from this ALaST run folder.")

    def validate(self, depth: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first bad key (``k_trainable`` is checked against ``depth`` when
        the model is known)."""
        _check_ranges(self, self.name)
        if not 0.0 < self.b_min <= 1.0:
            raise self.bad("b_min", "must be in (0, 1]")
        if not self.b_min <= self.b_init <= 1.0:
            raise self.bad("b_init", f"must be in [b_min, 1] = [{self.b_min}, 1]")
        if self.alpha is not None and self.alpha < 0:
            raise self.bad("alpha", "must be >= 0")
        if self.k_trainable is not None and not 1 <= self.k_trainable <= (depth or self.k_trainable):
            raise self.bad("k_trainable", f"must be in [1, {depth or 'depth'}]")
        if self.sampling not in SAMPLING_MODES:
            raise self.bad("sampling", f"must be one of {', '.join(SAMPLING_MODES)}")
        if self.temperature <= 0:
            raise self.bad("temperature", "must be > 0")
        if self.update not in ALAST_UPDATES:
            raise self.bad("update", f"must be one of {', '.join(ALAST_UPDATES)}")
        if self.spread <= 0:
            raise self.bad("spread", "must be > 0")
        if not 0.0 <= self.smoothing < 1.0:
            raise self.bad("smoothing", "must be in [0, 1)")
        if not isinstance(self.freeze, bool):
            raise self.bad("freeze", "must be true or false")
        if self.anneal_last is not None and not 0.0 <= self.anneal_last < 1.0:
            raise self.bad("anneal_last", "must be in [0, 1)")
        if self.keep_ratios is not None and (
                not all(isinstance(r, (int, float)) and 0 < r <= 1 for r in self.keep_ratios)
                or (depth is not None and len(self.keep_ratios) != depth)):
            raise self.bad("keep_ratios", f"must be {depth or 'depth'} numbers in (0, 1]")
        if self.trainable_blocks is not None and (
                not all(isinstance(i, int) and 0 <= i < (depth or i + 1) for i in self.trainable_blocks)):
            raise self.bad("trainable_blocks", f"must be block indices in [0, {depth or 'depth'})")


@dataclass
class LoraConfig(_Section):
    """LoRA settings (run-file key ``lora``).

    Attributes:
        r: Rank of every adapter.
        alpha: Scaling numerator: the update is ``alpha / r * B A x`` (LoRA paper, section 4.1).
        dropout: Dropout on the adapter's input (training only).
        targets: Which Linears of each block get an adapter, from ``qkv``, ``proj``, ``fc1``, ``fc2``.
    """

    SECTION = "lora"

    r: int = option(8, flag="--lora-r", help="LoRA rank (LoRA and Light-PEFT methods).")
    alpha: float = option(16.0, flag="--lora-alpha", help="LoRA scaling numerator (update = alpha/r * BA).")
    dropout: float = option(0.0, flag="--lora-dropout", help="Dropout on the adapters' input.")
    targets: list = option(flag="--lora-targets", help="Comma-separated Linears of each block to adapt.",
                           default_factory=lambda: list(LORA_TARGETS), parse="str_list")

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise self.bad("r", "must be an integer >= 1")
        if not self.alpha > 0:
            raise self.bad("alpha", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise self.bad("dropout", "must be in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"{self.name('targets')}: must be a non-empty subset of {', '.join(LORA_TARGETS)}, "
                              f"got {', '.join(map(str, self.targets)) or 'nothing'}")


@dataclass
class LightPeftConfig(_Section):
    """Light-PEFT settings (run-file key ``light_peft``); defaults are the paper's."""

    SECTION = "light_peft"

    estimation_steps: int = option(200, flag="--estimation-steps",
                                   help="Light-PEFT: steps of early estimation before pruning (part of --steps).")
    mask_l1: float = 1e-4
    head_prune_ratio: float = 1 / 3
    ffn_prune_ratio: float = 1 / 3
    module_keep_ratio: float = 0.25
    rank_keep_ratio: float = 0.5

    def validate(self) -> None:
        if not isinstance(self.estimation_steps, int) or self.estimation_steps < 2:
            raise self.bad("estimation_steps", "must be an integer >= 2")
        if self.mask_l1 < 0:
            raise self.bad("mask_l1", "must be >= 0")
        for key in ("head_prune_ratio", "ffn_prune_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise self.bad(key, "must be in [0, 1)")
        for key in ("module_keep_ratio", "rank_keep_ratio"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise self.bad(key, "must be in (0, 1]")


SECTIONS = {"alast": AlastConfig, "lora": LoraConfig, "light_peft": LightPeftConfig}


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
    return cls(**value)


@dataclass
class TrainConfig:
    """Everything a training run needs. Fields with a ``flag`` are ``edge-alast train`` options; every field is a
    run-file key.

    ``steps`` and ``epochs`` are alternatives: with neither, one epoch is run. ``batch_size`` and ``precision``
    default to the device profile's. ``eval_batch_size`` defaults to the training batch size: evaluation then never
    needs more memory than a training step (a larger eval batch set the peak RSS of head-only runs).
    """

    data: str = option(flag="--data", help="Training images: ImageFolder root (one sub-folder per class).")
    out: str = option(flag="--out", help="Run folder to write (metrics.jsonl, summary.json, ...).")
    model: str = option("vit_small_patch14_dinov2", flag="--model", help="timm model name.")
    model_args: dict = field(default_factory=dict)
    weights: str | None = option(None, flag="--weights", help="Local weights file (.safetensors or a torch state_dict).")
    val_data: str | None = option(None, flag="--val-data", help="Validation ImageFolder; default: a seeded split of "
                                                                "--data (--val-fraction).")
    classes: list | None = None  # class names in label order; the data folders may lack some (a fleet node's share)
    val_fraction: float = option(0.2, flag="--val-fraction", min=0.0, max=1.0, min_open=True, max_open=True,
                                 help="Share of each class held out for validation when --val-data is not given.")
    img_size: int = option(224, flag="--img-size", min=1,
                           help="Input side in pixels (at least the model's patch size).")
    profile: str | None = option(None, flag="--profile", help="Device profile: shipped name, 'auto', or a YAML path.")
    device: str | None = option(None, flag="--device", choices=DEVICES, help="Override the profile's device.")
    method: str = option("alast", flag="--method", choices=tuple(METHODS),
                         help="Fine-tuning method: " + "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()) + ".")
    steps: int | None = option(None, flag="--steps", min=1, help="Optimizer steps to train.")
    epochs: float | None = option(None, flag="--epochs", min=0, min_open=True,
                                  help="Epochs to train (alternative to --steps).")
    batch_size: int | None = option(None, flag="--batch-size", min=1, help="Batch size; default: the profile's (16 "
                                                                     "without one).")
    eval_batch_size: int | None = option(None, flag="--eval-batch-size", min=1,
                                         help="Evaluation batch size; default: the training batch size.")
    eval_every: int | None = option(None, flag="--eval-every", min=1,
                                    help="Also evaluate every N steps on a fixed validation subset (--eval-images), "
                                         "recorded as eval lines in metrics.jsonl (off by default).")
    eval_images: int | None = option(None, flag="--eval-images", min=1,
                                     help="Cap every evaluation at N validation images, spread evenly over them "
                                          "(every class): the final one (default: all) and the --eval-every points "
                                          "(default: 256).")
    # The stop rules (edge_alast.training.stopping): read in the loop at the step they refer to, so a run ends at the
    # same step on every rerun. Where a run ends is its result: a resume keeps them (resume_key).
    stop_at_plateau: bool = option(False, flag="--stop-at-plateau/--no-stop-at-plateau",
                                   help="End the run as a finished one (evaluated, saved, exported) at the "
                                        "--eval-every point where the validation curve has plateaued: its mean "
                                        "over the last plateau_window (3) evaluations has not gained plateau_min_gain "
                                        "(0.005) over plateau_patience (4) evaluations. An ALaST run that anneals "
                                        "(--alast-anneal-last) anneals from there first, ending once its last "
                                        "share of steps has. Needs --eval-every.")
    plateau_window: int = option(3, min=1)
    plateau_patience: int = option(4, min=1)
    plateau_min_gain: float = option(0.005, min=0)
    max_tflops: float | None = option(None, flag="--max-tflops", min=0, min_open=True,
                                      help="A compute budget: end the run as a finished one after the step that "
                                           "spends this many TFLOPs in training steps (checked after each step; "
                                           "with --eval-every, that step is a validation point too).")
    lr: float | None = option(None, flag="--lr", min=0, max=1, min_open=True,
                              help="Learning rate, in (0, 1]; default: the method's (3e-5 for full and alast, 1e-3 "
                                   "for head and the LoRA/Light-PEFT methods).")
    weight_decay: float | None = option(None, min=0)  # default 0.05; 0 with alast.update coauthors
    optimizer: str | None = option(None, choices=OPTIMIZERS)  # default adamw; adam with alast.update coauthors
    schedule: str = option("constant", flag="--schedule", choices=SCHEDULES, help="LR schedule.")
    warmup_steps: int = option(0, min=0)
    precision: str | None = option(None, flag="--precision", choices=PRECISIONS,
                                   help="Autocast precision; default: the profile's (fp32 without one).")
    seed: int = option(0, flag="--seed", min=0, max=SEED_MAX,
                       help="Seed for data order, splits, init and layer sampling (0 to 2**63-1).")
    train_embeddings: bool | None = option(None, flag="--train-embeddings",
                                           help="Train the patch and position embeddings (default: full does, the "
                                                "other methods do not; never below --freeze-below).")
    freeze_below: int = option(0, flag="--freeze-below", min=0,
                               help="Blocks below this index never train and store no activations (nor do the "
                                    "embeddings below them), whatever the method.")
    recompute_blocks: list = option(flag="--recompute-blocks", default_factory=list, parse="int_list",
                                    help="Comma-separated block indices whose activations are recomputed in "
                                         "backward (e.g. 0,1).")
    token_multiple: int = option(1, min=1)
    compile: str = option("auto", flag="--compile", choices=("auto", "on", "off"),  # = training.compiled.COMPILE_MODES
                          help="Compile each transformer block with torch.compile: on, off, or auto (on where the "
                               "device profile's compile field says it was measured to pay off; otherwise off: on "
                               "the 2-core x86 CPU measured, compile time was not won back in 200 steps).")
    # Return freed memory to the OS after each step (malloc_trim / tcmalloc's ReleaseFreeMemory). None: only when
    # a memory ceiling is planned, where the guard reads each step's own peak; elsewhere it cost a full step 0.1 s
    # plus re-faulting the pages (tools/bench_overhead.py, docs/benchmarks.md).
    trim_memory: bool | None = None
    allocator: str = option("auto", flag="--allocator", choices=ALLOCATORS,
                            help="malloc of the training process: auto (tcmalloc when installed, else glibc with "
                                 "a warning), tcmalloc or jemalloc by name, or glibc to keep the system's. The CLI "
                                 "re-executes itself once with LD_PRELOAD; the Python API runs on whatever its "
                                 "process has.")
    max_bad_fraction: float = option(0.5, flag="--max-bad-fraction", min=0.0, max=1.0,
                                     help="Fail (exit 3) when more than this share of image files is unreadable "
                                          "(files over the image limits count as unreadable).")
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, flag="--max-image-pixels", min=1,
                                   help="Refuse (skip as unreadable) images with more pixels than this, read from "
                                        "the file's header before decoding (a board decodes the whole image).")
    max_aspect_ratio: float = option(MAX_ASPECT_RATIO, flag="--max-aspect-ratio", min=1.0,
                                     help="Refuse (skip as unreadable) images whose long side is more than this "
                                          "many times the short side.")
    augment: str = option("flip", flag="--augment", choices=AUGMENTATIONS,
                          help="Training augmentation: none (the model's eval view: resize by its crop_pct, centre "
                               "crop), flip (that view flipped left-right half the time), rrc-flip (timm's "
                               "RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3, then the flip). Evaluation and "
                               "prediction never augment.")
    loader_threads: int | None = option(None, flag="--loader-threads", min=0,
                                        help="Threads decoding the next batches while a step computes; default: the "
                                             "profile's threads, else min(2, CPUs); 0 decodes inside the step.")
    checkpoint_every_seconds: float | None = option(300.0, flag="--checkpoint-every-seconds", min=0, min_open=True,
                                                    help="Checkpoint interval in seconds.")
    checkpoint_every_steps: int | None = option(None, flag="--checkpoint-every-steps", min=1,
                                                help="Also checkpoint every N steps.")
    resume: bool | None = option(None, flag="--resume/--no-resume",
                                 help="Resume from the run folder's checkpoint (default: automatically when it holds "
                                      "one of the same settings); --no-resume starts over, discarding them.")
    export: bool = option(True, flag="--export/--no-export",
                          help="Export model.onnx + manifest.json at the end (parity-checked in onnxruntime).")
    device_key: str | None = option(None, flag="--device-key", envvar="EDGE_ALAST_DEVICE_KEY_FILE",
                                    help="Device key file: checkpoints are signed with it (HMAC-SHA256) and a "
                                         "checkpoint not signed with it is refused (exit 2). Default: off.")
    alast: AlastConfig = field(default_factory=AlastConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    light_peft: LightPeftConfig = field(default_factory=LightPeftConfig)

    def __post_init__(self):
        for key in SECTIONS:  # the Python API may pass the sections as plain mappings, as a run file does
            setattr(self, key, _section(key, getattr(self, key), "config"))
        _check_numbers(self, self.name)
        # No --lr: the method's own (methods.MethodSpec.default_lr), resolved here so that everything downstream,
        # the resume key included, sees one number; lr_source tells summary.json which it was.
        self.lr_source = "given" if self.lr is not None else "method default"
        spec = METHODS.get(self.method)  # None: an unknown method, refused by validate()
        if self.lr is None and spec is not None:
            self.lr = spec.default_lr
        # alast.update coauthors reproduces the co-authors' set-up: Adam without weight decay, embeddings trained.
        coauthors = spec is not None and spec.alast and self.alast.update == COAUTHORS
        if self.optimizer is None:
            self.optimizer = "adam" if coauthors else "adamw"
        if self.weight_decay is None:
            self.weight_decay = 0.0 if coauthors else 0.05
        if self.train_embeddings is None and coauthors:
            self.train_embeddings = True
        # No alast.anneal_last: the method's (methods.MethodSpec.default_anneal_last), for the update it was measured
        # with (reference); the other updates reproduce a method (coauthors) or are matched-cost baselines.
        if self.alast.anneal_last is None:
            measured = spec is not None and self.alast.update == "reference"
            self.alast.anneal_last = spec.default_anneal_last if measured else 0.0

    def name(self, key: str) -> str:
        return field_name(TrainConfig, key)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{self.name(key)}: {why}")

        if isinstance(self.compile, bool):  # a run file's `compile: on` / `off`, which YAML reads as true / false
            self.compile = "on" if self.compile else "off"
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise bad(f.name, f"must be one of {', '.join(choices)}, got {value!r}")
            if str(f.type).replace(" ", "") in ("bool", "bool|None") and not isinstance(value, (bool, type(None))):
                raise bad(f.name, f"must be true or false, got {value!r}")
        if self.steps is not None and self.epochs is not None:
            raise bad("steps", "give --steps or --epochs, not both")
        if self.lr is None:
            raise bad("lr", "no learning rate and no method default")
        if self.stop_at_plateau and not self.eval_every:
            raise bad("stop_at_plateau", "needs --eval-every N: the plateau is read from the validation curve")
        _check_ranges(self, self.name)
        if any(not isinstance(i, int) or i < 0 for i in self.recompute_blocks):
            raise bad("recompute_blocks", f"must be block indices >= 0, got {self.recompute_blocks}")
        spec = METHODS[self.method]
        # Every section, whatever the method: a run file's lora or light_peft keys are checked even when the method
        # does not use them (a typo or a hostile value would otherwise wait for the day the method changes).
        self.alast.validate()
        self.lora.validate()
        self.light_peft.validate()
        if spec.light_peft:
            if self.freeze_below:
                raise bad("freeze_below", f"cannot apply to {self.method}: Light-PEFT estimates the heads and FFN "
                                          "units of every block to prune them")
            if self.steps is not None and self.steps <= self.light_peft.estimation_steps:
                raise bad("steps", f"must exceed {self.light_peft.name('estimation_steps')} "
                                   f"({self.light_peft.estimation_steps}) for {self.method}: steps count estimation "
                                   f"and fine-tuning, got {self.steps}")

    # Fields that may change between an interrupted run and its resumption without changing the result.
    RESUME_FREE = ("resume", "checkpoint_every_seconds", "checkpoint_every_steps", "out", "eval_every", "eval_images",
                   "loader_threads", "allocator", "device_key", "trim_memory", "compile")

    def resume_key(self, precision: str | None = None) -> dict[str, Any]:
        """The settings a checkpoint must share with this config to be resumed by it; ``precision``: the one
        ``auto`` resolved to (a timing probe decides it, so another day may pick another)."""
        key = {k: v for k, v in self.to_dict().items() if k not in self.RESUME_FREE}
        if self.stop_at_plateau or self.max_tflops is not None:  # the stop rules read the curve: its points count
            key["eval_every"], key["eval_images"] = self.eval_every, self.eval_images
        if precision is not None:
            key["precision_resolved"] = precision
        return key

    def resume_differs(self, saved: dict[str, Any], precision: str | None = None) -> list[str]:
        """The settings in which a checkpoint's ``saved`` resume key differs from this config's. A setting the
        checkpoint predates (added since: ``max_image_pixels``, or a section key such as ``alast.anneal_last``)
        counts as its default, or as what runs did before it existed where that differs (``_Section.PREDATES``)."""
        saved = dict(saved)
        for f in dataclasses.fields(self):
            if (f.name not in saved and f.name not in SECTIONS and f.name not in self.RESUME_FREE
                    and f.default is not dataclasses.MISSING):
                saved[f.name] = f.default
        for key, cls in SECTIONS.items():
            if isinstance(saved.get(key), dict):
                saved[key] = {**dataclasses.asdict(cls()), **cls.PREDATES, **saved[key]}
        # a free setting is in a key only where the stop rules make it count: compared where both keys hold it
        return sorted(k for k, v in self.resume_key(precision).items()
                      if (k in saved or k not in self.RESUME_FREE) and saved.get(k) != v)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def image_limits(self) -> dict[str, Any]:
        """``--max-image-pixels`` and ``--max-aspect-ratio`` as :class:`edge_alast.data.images.ImageLimits`
        keyword arguments."""
        return {"max_pixels": self.max_image_pixels, "max_aspect_ratio": self.max_aspect_ratio}

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
