"""Setting a run up: everything the training loop needs, resolved from a :class:`~edge_alast.config.TrainConfig`.

:func:`setup_run` resolves the device profile, device, precision and threads, prepares the run folder, scans the
data, builds the model (weights, adapters, masks), makes the one record of what can ever train, plans against the
profile's ceilings, and finds the checkpoint to resume. The trainer, ``tools/`` and the fleet node all call it; the
loop itself never resolves configuration.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..alast.baselines import baseline_config
from ..device.calibration import full_tokens
from .checkpoint import checkpoints, load_latest
from ..atomic import SPACE_MARGIN_BYTES, free_bytes, open_nofollow
from ..integrity import read_device_key
from ..config import AlastConfig, TrainConfig
from ..data.loader import BatchLoader, BatchOrder, Preprocess
from ..errors import ConfigError, DataError, DiskFullError
from ..model.flops import StepFlopCounter
from ..device.guard import MemoryGuard
from ..data.images import BadImages, ImageLimits, scan_image_folder, scan_warnings, split_samples
from ..adapters.lightpeft import add_masks
from ..adapters.lora import apply_lora
from ..methods import METHODS, MethodSpec
from ..model.build import create_model, data_config, load_weights
from ..device.planner import RunPlan, plan_run
from ..alast.policy import PolicyCaps, make_policy, tokens_per_block
from ..device.precision import resolve_precision
from .compiled import missing_toolchain, resolve_compile
from ..device.profiles import DeviceProfile, ProfileError, load_profile
from ..alast.support import check_model
from ..model.trainable import TrainableSet


EVAL_EVERY_IMAGES = 256  # --eval-every's subset when --eval-images is not given


@dataclass
class Run:
    """A run, set up (see module docstring).

    Attributes:
        config: The validated configuration.
        spec: The method's record.
        profile: The device profile (None without one).
        device, precision: Resolved (``auto`` measured).
        run_dir: The run folder (exists and is writable).
        classes, train_samples, val_samples: The data; ``warnings`` names skipped files and empty classes.
        eval_samples: The fixed validation subset ``--eval-every`` evaluates on (empty without it).
        final_eval_samples (property): What the final evaluation reads: ``--eval-images`` of the validation images
            (all by default).
        order: The training batches as a function of the step (its batch size is the plan's, or the resumed
            checkpoint's).
        total_steps: Steps of the whole run.
        model: The model on its device, adapters and masks in place, ``requires_grad`` set to ``trainable``.
        preprocess: Image to tensor, from the model's data config.
        trainable: What can ever train in the first stage.
        flop_counter: The FLOP model of the model as built (the first stage's).
        base_params: Parameters of the model before adapters, masks or pruning.
        plan: The planner's decision (None without a profile).
        caps: The caps in force (the plan's, or the resumed checkpoint's).
        guard: The runtime memory guard (None without a memory ceiling).
        alast: The ALaST settings the policy uses (the config's, with a baseline's keep ratios and blocks filled
            in from ``--alast-from``); ``baseline``: what that matched, for the summary.
        checkpoint: The checkpoint to resume from (None: start at step 0); the trainer drops it once restored.
        resume_notes: Checkpoints passed over, in words.
        device_key: The ``--device-key`` that signs and checks checkpoints (None: plain sha256).
        compile, compile_reason: Whether each stage compiles its blocks (``--compile``), and why
            (:func:`edge_alast.training.compiled.resolve_compile`).
        bad_images: Training files that failed to decode when used, counted against ``--max-bad-fraction`` with the
            scan's skips (checkpointed); ``val_bad_images`` the same for validation (the same record when the
            validation images are a split of ``--data``).
    """

    config: TrainConfig
    spec: MethodSpec
    profile: DeviceProfile | None
    device: str
    precision: str
    run_dir: Path
    classes: list[str]
    train_samples: list
    val_samples: list
    warnings: list[str]
    order: BatchOrder
    total_steps: int
    model: nn.Module
    preprocess: Preprocess
    trainable: TrainableSet
    flop_counter: StepFlopCounter
    base_params: int
    plan: RunPlan | None
    caps: PolicyCaps
    guard: MemoryGuard | None
    eval_samples: list = field(default_factory=list)
    alast: AlastConfig = field(default_factory=AlastConfig)
    baseline: dict | None = None
    checkpoint: dict[str, Any] | None = None
    resume_notes: list[str] = field(default_factory=list)
    bad_images: BadImages | None = None
    val_bad_images: BadImages | None = None
    cuda_memory_cap_bytes: int | None = None
    device_key: bytes | None = None
    compile: bool = False
    compile_reason: str = ""

    @property
    def final_eval_samples(self) -> list:
        return spread(self.val_samples, self.config.eval_images)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size or self.order.batch_size


def setup_run(config: TrainConfig) -> Run:
    """Resolve ``config`` into a :class:`Run` (see module docstring).

    Raises:
        ConfigError: a bad option, profile, weights file, output folder, or a plan that cannot fit (exit 2).
        DataError: unusable data (exit 3).
    """
    config.validate()
    spec = METHODS[config.method]
    profile, device, precision, batch_size = _resolve_device(config)
    torch.manual_seed(config.seed)  # the model's initialisation and the adapters' draw from it
    device_key = read_device_key(config.device_key)
    run_dir = _prepare_run_dir(Path(config.out))
    data = _scan_data(config)
    model, preprocess, base_params = _build_model(config, spec, len(data.classes), device)
    trainable = TrainableSet.for_method(model, spec, train_embeddings=config.train_embeddings,
                                        freeze_below=config.freeze_below)
    trainable.apply(model)
    flop_counter = StepFlopCounter(model, trainable)
    alast, baseline = _alast_settings(config, spec, model, trainable, flop_counter, batch_size)
    recompute = tuple(i in config.recompute_blocks for i in range(len(model.blocks)))
    run = Run(config=config, spec=spec, profile=profile, device=device, precision=precision, run_dir=run_dir,
              classes=data.classes, train_samples=data.train_samples, val_samples=data.val_samples,
              warnings=data.warnings, order=BatchOrder(len(data.train_samples), batch_size, config.seed),
              total_steps=0, model=model, preprocess=preprocess, trainable=trainable, flop_counter=flop_counter,
              base_params=base_params, plan=None,
              caps=PolicyCaps(lowest_trainable=config.freeze_below, recompute=recompute), guard=None,
              eval_samples=spread(data.val_samples, config.eval_images or EVAL_EVERY_IMAGES)
              if config.eval_every else [],
              alast=alast, baseline=baseline, bad_images=data.bad_images, val_bad_images=data.val_bad_images,
              device_key=device_key)
    run.compile, run.compile_reason = resolve_compile(config.compile, profile.compile if profile else None)
    missing = missing_toolchain(device) if run.compile else None
    if missing and config.compile == "on":
        raise ConfigError(f"--compile on: torch.compile cannot build kernels here: {missing}; or use --compile off")
    if missing:  # auto, from a profile measured elsewhere: eager, said so
        run.compile, run.compile_reason = False, f"auto: the profile enables it, but {missing}"
        run.warnings.append(f"--compile auto stays eager: {missing}")
    if profile is not None:
        _plan(run, profile)
    if run.compile and run.plan is not None and run.plan.memory_ceiling_bytes:
        run.warnings.append("--compile: the planner's memory model is calibrated on eager blocks, and compiled runs "
                            "peaked 70-100 MiB higher where measured (docs/benchmarks.md#compiled-steps); the memory "
                            "guard still reads each step's real peak and tightens the caps if it comes near the "
                            "ceiling")
    _find_resume_point(run)
    run.total_steps = _total_steps(config, run.order)
    return run


# -------------------------------------------------------------------------------------------- parts of setup_run
def _resolve_device(config: TrainConfig) -> tuple[DeviceProfile | None, str, str, int]:
    """The device profile, device, precision and batch size; the profile's threads are set."""
    profile = None
    if config.profile is not None:
        try:
            profile = load_profile(config.profile)
        except ProfileError as e:
            raise ConfigError(f"--profile: {e}") from e
    device = config.device or (profile.device if profile else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--profile {profile.name if profile else ''} runs on cuda, and this host has no CUDA device; "
                          "pass --device cpu to apply the profile's ceilings on this CPU")
    precision = resolve_precision(config.precision or (profile.default_precision if profile else "fp32"), device,
                                  tuple(profile.fast_precisions) if profile else ())
    batch_size = config.batch_size or (profile.default_batch_size if profile else 16)
    if profile is not None and profile.threads:
        torch.set_num_threads(int(profile.threads))
    return profile, device, precision, batch_size


@dataclass
class _Data:
    classes: list[str]
    train_samples: list
    val_samples: list
    warnings: list[str]
    bad_images: BadImages
    val_bad_images: BadImages


def _scan_data(config: TrainConfig) -> _Data:
    """The training and validation samples (``--val-data``, else a seeded split of ``--data``), the files skipped,
    and the records of files that fail to decode when used."""
    limits = ImageLimits(**config.image_limits)
    folder = scan_image_folder(config.data, classes=config.classes, option="--data",
                               max_bad_fraction=config.max_bad_fraction, limits=limits)
    warnings = scan_warnings(folder, "--data")
    if len(folder.classes) < 2:
        raise DataError(f"--data: {config.data} has one usable class ({folder.classes[0]}); a classifier needs "
                        "at least two class folders with images")
    bad_images = BadImages(folder, "--data", config.max_bad_fraction)
    if not config.val_data:
        train_samples, val_samples = split_samples(folder, config.val_fraction, config.seed)
        return _Data(folder.classes, train_samples, val_samples, warnings, bad_images, bad_images)
    val_folder = scan_image_folder(config.val_data, classes=folder.classes, option="--val-data",
                                   max_bad_fraction=config.max_bad_fraction, limits=limits)
    warnings += scan_warnings(val_folder, "--val-data")
    return _Data(folder.classes, folder.samples, val_folder.samples, warnings, bad_images,
                 BadImages(val_folder, "--val-data", config.max_bad_fraction))


def _build_model(config: TrainConfig, spec: MethodSpec, num_classes: int,
                 device: str) -> tuple[nn.Module, Preprocess, int]:
    """The model on ``device`` with its weights, the method's adapters and masks; its preprocessing and its
    parameter count before adapters. Refuses options that do not fit the model."""
    model = create_model(config.model, num_classes=num_classes, img_size=config.img_size, **config.model_args)
    if spec.alast:  # refuse, before anything is loaded, a model ALaST would train wrongly or crash on
        check_model(model, config.model)
    if config.weights:
        load_weights(model, config.weights)
    preprocess = Preprocess(config.img_size, **data_config(model), limits=ImageLimits(**config.image_limits))
    base_params = sum(p.numel() for p in model.parameters())
    try:  # a model these methods cannot adapt is a configuration error (exit 2), named
        if spec.lora:
            apply_lora(model, config.lora)
        if spec.light_peft:
            add_masks(model)
    except TypeError as e:
        raise ConfigError(f"--method {config.method}: {config.model}: {e}") from e
    model.to(device)
    depth = len(model.blocks)
    if config.freeze_below >= depth or any(i >= depth for i in config.recompute_blocks):
        raise ConfigError(f"--freeze-below/--recompute-blocks: {config.model} has {depth} blocks (0..{depth - 1})")
    if spec.alast:
        config.alast.validate(depth)
    return model, preprocess, base_params


def _alast_settings(config: TrainConfig, spec: MethodSpec, model: nn.Module, trainable: TrainableSet,
                    flop_counter: StepFlopCounter, batch_size: int) -> tuple[AlastConfig, dict | None]:
    """The ALaST settings the policy uses (``--seed`` seeds layer sampling unless ``alast.seed`` says otherwise; a
    static/random baseline's keep ratios and blocks from ``--alast-from``) and what that baseline matched."""
    alast = config.alast
    if alast.seed is None:
        alast = dataclasses.replace(alast, seed=config.seed)
    if spec.alast and alast.update in ("static", "random") and alast.from_run:
        return _baseline(config, model, trainable, flop_counter, batch_size)
    return alast, None


def _plan(run: Run, profile: DeviceProfile) -> None:
    """Plan against ``profile``'s ceilings: the run's plan, caps and batch size, and its memory guard."""
    try:
        run.plan = plan_for(run, profile)
    except ConfigError as e:
        raise ConfigError(f"--profile {profile.name}: no plan fits this device: {e}") from e
    run.caps = run.plan.caps
    if run.plan.batch_size != run.order.batch_size:
        run.order = BatchOrder(len(run.train_samples), run.plan.batch_size, run.config.seed)
    if run.plan.memory_ceiling_bytes:
        run.guard = _memory_guard(run)
        if run.device == "cuda":
            run.cuda_memory_cap_bytes = _cap_cuda_allocator(run.plan.memory_ceiling_bytes)


def _cap_cuda_allocator(ceiling_bytes: int) -> int:
    """Hold the CUDA allocator to the profile's ceiling (on a Jetson, whose memory CPU and GPU share, the ceiling
    less this process's RSS), so that the run fails in-process rather than through the board's OOM killer."""
    from ..device import host
    from ..device.memory import cap_cuda_memory

    return cap_cuda_memory(ceiling_bytes, unified=host.board_model()["l4t"] is not None)


def _memory_guard(run: Run) -> MemoryGuard:
    """The guard of ``run``'s plan; it predicts with the policy the trainer passes each check (the stage's)."""
    cost = run.plan.cost

    def predict(caps: PolicyCaps, policy) -> float:  # the worst training step under caps (the guard's concern)
        # the batch size in force now: a resume may restore the checkpoint's, set after this guard was made
        return cost.worst_peak(policy.worst_plans(caps), run.order.batch_size)["train_peak"]

    return MemoryGuard(run.plan.memory_ceiling_bytes, run.depth, kind=run.spec.plan_kind, predict=predict,
                       train_below=run.trainable.embeddings, b_min=run.alast.b_min if run.spec.alast else None)


def _find_resume_point(run: Run) -> None:
    """The checkpoint to resume (the trainer restores it), and the caps and batch size in force when it was
    written: a fresh plan could differ (it measures live RSS)."""
    run.checkpoint, run.resume_notes = _find_checkpoint(run.config, run.run_dir, run.precision, run.device_key)
    if run.checkpoint is None:
        return
    _check_room_to_resume(run)
    run.caps = PolicyCaps.from_state(run.checkpoint["caps"])
    if run.checkpoint["batch_size"] != run.order.batch_size:
        run.order = BatchOrder(len(run.train_samples), run.checkpoint["batch_size"], run.config.seed)


def plan_for(run: Run, profile: DeviceProfile | None, policy=None) -> RunPlan:
    """The planner's decision for ``run``'s model, method and batch under ``profile``'s ceilings (None: no
    ceilings, the free plan and its predictions), for ``policy`` (default: the first stage's). Call before any
    optimizer state exists: the planner measures this process's baseline RSS and calibrates activation bytes on a
    copy of one block (see planner.py)."""
    config, spec = run.config, run.spec
    policy = policy or make_policy(spec, spec.stages[0], run.depth, run.alast, lr=config.lr)
    return plan_run(run.model, profile, policy=policy,
                    kind=spec.plan_kind, trainable=run.trainable, img_size=config.img_size,
                    batch_size=run.order.batch_size, precision=run.precision, device=run.device,
                    lowest_trainable=config.freeze_below, recompute=run.caps.recompute,
                    token_multiple=config.token_multiple, flop_counter=run.flop_counter, export=config.export,
                    eval_batch_size=min(run.eval_batch_size, max(1, len(run.val_samples))))


def _baseline(config: TrainConfig, model: nn.Module, trainable: TrainableSet, flop_counter: StepFlopCounter,
              batch_size: int) -> tuple[AlastConfig, dict]:
    """The static/random baseline's settings from ``--alast-from``, at the FLOPs of that run (baselines.py)."""
    tokens_in = full_tokens(model, config.img_size)
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    def flops_of(keep, train) -> int:
        tokens = tokens_per_block(tokens_in, prefix, keep, config.token_multiple)[:-1]
        return flop_counter.step_flops(batch_size, config.img_size, tokens, train, train_embeddings=trainable.embeddings,
                                       keep_ratios=keep, train_final_norm=trainable.final_norm)

    try:
        return baseline_config(config.alast, len(model.blocks), flops_of)
    except OSError as e:
        raise ConfigError(f"--alast-from: cannot read {config.alast.from_run}: {e}") from e


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items``, evenly spaced (every class of a class-sorted sample list); None: all."""
    if limit is None or limit >= len(items):
        return list(items)
    return items[::max(1, len(items) // limit)][:limit]


def loader_threads(config: TrainConfig, profile: DeviceProfile | None) -> int:
    """Background decoding threads: ``--loader-threads``, else the profile's threads, else min(2, CPUs)."""
    if config.loader_threads is not None:
        return config.loader_threads
    if profile is not None and profile.threads:
        return int(profile.threads)
    return min(2, os.cpu_count() or 1)


def make_loader(run: Run, on_warning=None) -> BatchLoader:
    """The training loader of ``run`` (:class:`~edge_alast.data.loader.BatchLoader`): its batch order, augmentation and
    record of unreadable files, decoding ahead on :func:`loader_threads` threads. ``close()`` it when done."""
    config = run.config
    return BatchLoader(run.train_samples, run.order, run.preprocess, bad=run.bad_images, augment=config.augment,
                       seed=config.seed, threads=loader_threads(config, run.profile), steps=run.total_steps,
                       on_warning=on_warning)


def _prepare_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir`` and prove it writable; remove temp files a power cut left. The probe is created with
    ``O_NOFOLLOW``: a planted ``.write-test`` link is refused (UnsafePathError), never followed."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        os.close(open_nofollow(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        probe.unlink()
        for stale in run_dir.glob(".*.tmp"):  # temp files of atomic writes cut short by a power loss
            stale.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {run_dir}: {e}") from e
    return run_dir


def _check_room_to_resume(run: Run) -> None:
    """A resumed run writes its next checkpoint beside the one it resumed: refuse at once, naming both, when the
    disk has no room for it, rather than train until that save fails again (a restart loop on a full disk)."""
    step = int(run.checkpoint["step"])
    path = dict(checkpoints(run.run_dir))[step]
    needed, free = path.stat().st_size, free_bytes(run.run_dir)
    if free < needed + SPACE_MARGIN_BYTES:
        raise DiskFullError(f"--out: disk full: {run.run_dir} resumes from {path.name} (step {step}, kept), but its "
                            f"next checkpoint needs about {needed} bytes (+{SPACE_MARGIN_BYTES} margin) and "
                            f"{free} are free; free some space and run the same command again")


def _find_checkpoint(config: TrainConfig, run_dir: Path, precision: str,
                     key: bytes | None = None) -> tuple[dict | None, list[str]]:
    """The newest valid checkpoint of a run with these settings, or None; ``--no-resume`` deletes them."""
    if config.resume is False:
        for _, path in checkpoints(run_dir):  # starting over: a stale checkpoint must not be resumed later
            path.with_suffix(".sha256").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        return None, []
    checkpoint, notes = load_latest(run_dir, key)
    notes = [f"--out: {note}" for note in notes]
    if checkpoint is None:
        if config.resume:
            raise ConfigError(f"--resume: no valid checkpoint in {run_dir}")
        return None, notes
    differs = config.resume_differs(checkpoint["config"], precision)
    if differs:
        raise ConfigError(f"--out: {run_dir} holds a checkpoint of a run with other settings "
                          f"({', '.join(differs)}); use another --out, or the same settings to resume")
    return checkpoint, notes


def _total_steps(config: TrainConfig, order: BatchOrder) -> int:
    """``--steps``, else ``--epochs`` of ``order``'s batches; Light-PEFT must have steps left after estimating."""
    total = config.steps if config.steps is not None else max(
        1, math.ceil((config.epochs or 1.0) * order.batches_per_epoch))
    if METHODS[config.method].light_peft and total <= config.light_peft.estimation_steps:
        raise ConfigError(f"{config.light_peft.name('estimation_steps')}: {config.method} runs {total} "
                          f"steps in all, which leaves none for fine-tuning after "
                          f"{config.light_peft.estimation_steps} estimation steps; train longer or estimate shorter")
    return total
