"""The training loop: policy decides the step plan -> mechanism applies it -> forward/backward/step -> policy
observes. One function, sectioned top to bottom; no callbacks do the real work.
"""
from __future__ import annotations

import functools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import __version__
from .atomic import atomic_write, atomic_write_json
from .checkpoint import checkpoints, load_latest, save_checkpoint
from .config import ALAST_METHODS, LIGHT_PEFT_METHODS, LORA_METHODS, TrainConfig, plan_kind
from .data import BatchOrder, Preprocess, iter_batches, load_batch
from .images import scan_image_folder, scan_warnings, split_samples
from .errors import ConfigError, DataError
from .flops import StepFlopCounter
from .lightpeft import ImportanceRecorder, add_masks, apply_pruning, mask_penalty, plan_pruning
from .lora import apply_lora, merge_lora
from .memory import peak_rss_bytes, rss_bytes, trim_heap
from .models import create_model, data_config, load_weights
from .patch import apply_patch
from .planner import MemoryGuard, plan_run
from .profiles import ProfileError, load_profile, read_cpu_flags
from .policy import AlastPolicy, PolicyCaps, StaticPolicy

EMBEDDING_PARAMS = ("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token", "pos_embed_")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run produced."""

    summary: dict[str, Any]
    run_dir: Path


def resolve_precision(requested: str, device: str, fast: tuple[str, ...] = ()) -> str:
    """``auto``: on CUDA, bf16 where supported (compute capability >= 8), else fp16 where the profile lists it as
    fast, else fp32. On a CPU with bf16 instructions (avx512_bf16/AMX), bf16 only if it measures faster than fp32
    (:func:`cpu_bf16_is_faster`): with avx512_bf16 but no AMX, torch 2.13's bf16 matmul ran at 0.6x the fp32 rate
    on this project's CI CPU, so the flag alone is not enough."""
    if requested != "auto":
        return requested
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if "fp16" in fast else "fp32"
    if ("bf16" in fast or read_cpu_flags() & {"avx512_bf16", "amx_bf16"}) and cpu_bf16_is_faster():
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(size: tuple[int, int, int] = (1024, 1536, 384), repeats: int = 5) -> bool:
    """Time a ViT-S-sized matmul (MLP fc2 at ~1k tokens) in bf16 and fp32 on this CPU; about 0.1 s, once."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size[0], size[1], dtype=dtype)
        b = torch.randn(size[1], size[2], dtype=dtype)
        a @ b  # warm-up: kernel selection, first-touch pages
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - t0
    return timings[torch.bfloat16] < 0.9 * timings[torch.float32]


def train(config: TrainConfig, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run folder ``config.out``.

    Args:
        config: The run configuration.
        on_event: Called with each event dict (start, step, warning, eval, done); library code never prints.
        should_stop: Polled after each step; True checkpoints and returns at once (summary ``interrupted``;
            running again with the same config resumes exactly).

    Returns:
        The summary (as written to ``summary.json``) and the run folder.
    """
    emit = on_event or (lambda event: None)
    config.validate()

    # ---------------------------------------------------------------- device profile, precision, threads
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
    torch.manual_seed(config.seed)

    # ---------------------------------------------------------------- run folder
    run_dir = Path(config.out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        for stale in run_dir.glob(".*.tmp"):  # temp files of atomic writes cut short by a power loss
            stale.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {run_dir}: {e}") from e

    # ---------------------------------------------------------------- data
    folder = scan_image_folder(config.data, option="--data", max_bad_fraction=config.max_bad_fraction)
    warnings = scan_warnings(folder, "--data")
    if len(folder.classes) < 2:
        raise DataError(f"--data: {config.data} has one usable class ({folder.classes[0]}); a classifier needs "
                        "at least two class folders with images")
    if config.val_data:
        val_folder = scan_image_folder(config.val_data, classes=folder.classes, option="--val-data",
                                       max_bad_fraction=config.max_bad_fraction)
        warnings += scan_warnings(val_folder, "--val-data")
        train_samples, val_samples = folder.samples, val_folder.samples
    else:
        train_samples, val_samples = split_samples(folder, config.val_fraction, config.seed)
    for w in warnings:
        emit({"event": "warning", "message": w})
    order = BatchOrder(len(train_samples), batch_size, config.seed)
    total_steps = _total_steps(config, order)

    # ---------------------------------------------------------------- model and weights
    model = create_model(config.model, num_classes=len(folder.classes), img_size=config.img_size,
                         **config.model_args)
    if config.weights:
        load_weights(model, config.weights)
    preprocess = Preprocess(config.img_size, **data_config(model))
    base_params = sum(p.numel() for p in model.parameters())
    light_peft = config.method in LIGHT_PEFT_METHODS
    estimation_steps = config.light_peft.estimation_steps if light_peft else 0
    try:  # a model these methods cannot adapt is a configuration error (exit 2), named
        if config.method in LORA_METHODS:
            apply_lora(model, config.lora)  # freezes the blocks' own weights; adapters train
        if light_peft:
            add_masks(model)
    except TypeError as e:
        raise ConfigError(f"--method {config.method}: {config.model}: {e}") from e
    model.to(device)
    depth = len(model.blocks)

    # ---------------------------------------------------------------- what trains
    # Block parameters: all of them (full, alast), their adapters and masks (LoRA methods), none (head). Per step
    # the mechanism freezes blocks among these. Outside the blocks: the head and final norm, and the embeddings
    # with --train-embeddings (always for full).
    train_embeddings = config.train_embeddings or config.method == "full"
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            if config.method == "head":
                p.requires_grad_(False)
            continue
        is_embedding = name.startswith(EMBEDDING_PARAMS)
        is_head = name.startswith(("head.", "head_dist."))
        p.requires_grad_(is_head if config.method == "head" else (train_embeddings if is_embedding else True))
    flop_counter = StepFlopCounter(model)  # before patching: it copies the blocks (and their flags) to meta
    if config.freeze_below >= depth or any(i >= depth for i in config.recompute_blocks):
        raise ConfigError(f"--freeze-below/--recompute-blocks: {config.model} has {depth} blocks (0..{depth - 1})")
    recompute = tuple(i in config.recompute_blocks for i in range(depth))

    # ---------------------------------------------------------------- plan against the profile's ceilings
    # Before the patch and the optimizer exist: the planner measures this process's baseline RSS and calibrates
    # activation bytes on a copy of one block (see planner.py).
    run_plan = guard = None
    if profile is not None:
        try:
            run_plan = plan_run(model, profile, img_size=config.img_size, batch_size=order.batch_size,
                                precision=precision, method=plan_kind(config.method), alast_config=config.alast,
                                device=device,
                                lowest_trainable=config.freeze_below, recompute=recompute,
                                train_embeddings=train_embeddings, token_multiple=config.token_multiple,
                                eval_batch_size=min(config.eval_batch_size or order.batch_size,
                                                    max(1, len(val_samples))),
                                flop_counter=flop_counter)
        except ConfigError as e:
            raise ConfigError(f"--profile {profile.name}: no plan fits this device: {e}") from e
        if run_plan.batch_size != order.batch_size:
            order = BatchOrder(len(train_samples), run_plan.batch_size, config.seed)
            total_steps = _total_steps(config, order)
        if run_plan.memory_ceiling_bytes:
            guard = MemoryGuard(run_plan.memory_ceiling_bytes, depth, method=plan_kind(config.method))
        for note in run_plan.notes:
            emit({"event": "plan", "message": note})
    caps = run_plan.caps if run_plan else PolicyCaps(lowest_trainable=config.freeze_below, recompute=recompute)
    # Light-PEFT: stage 1 (estimation, steps [0, estimation_steps)) trains adapters and masks on every block with
    # every token; at step estimation_steps the model is pruned (stage 2) and the stages are rebuilt for stage 3.
    if light_peft and total_steps <= estimation_steps:
        raise ConfigError(f"--estimation-steps: {config.method} runs {total_steps} steps in all, which leaves none for "
                          f"fine-tuning after {estimation_steps} estimation steps; train longer or estimate shorter")
    recorder = ImportanceRecorder(model, estimation_steps) if light_peft else None
    pruning = pruned = None  # stage 2's spec, and what it kept (for the summary)
    handle, policy, optimizer, scheduler = _stage(model, config, depth, caps, total_steps,
                                                  alast=config.method in ALAST_METHODS and not light_peft)
    autocast = (torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[precision])
                if precision in AUTOCAST_DTYPES else nullcontext())
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    # ---------------------------------------------------------------- resume
    metrics_path = run_dir / "metrics.jsonl"
    history = {"step_seconds": [], "step_flops": [], "losses": []}
    first_step = 0
    checkpoint = None
    if config.resume is not False:
        checkpoint, notes = load_latest(run_dir)
        for note in notes:
            emit({"event": "warning", "message": f"--out: {note}"})
        if checkpoint is None and config.resume:
            raise ConfigError(f"--resume: no valid checkpoint in {run_dir}")
    if checkpoint is not None:
        differs = sorted(k for k, v in config.resume_key().items() if checkpoint["config"].get(k) != v)
        if differs:
            raise ConfigError(f"--out: {run_dir} holds a checkpoint of a run with other settings "
                              f"({', '.join(differs)}); use another --out, or the same settings to resume")
        if checkpoint.get("pruning") is not None:  # resumed in stage 3: rebuild the pruned model first
            pruning, recorder = checkpoint["pruning"], None
            flop_counter, handle, policy, optimizer, scheduler = _prune(model, handle, pruning, config, depth, caps,
                                                                        total_steps, estimation_steps)
            pruned = _pruning_summary(model, pruning, base_params)
        elif recorder is not None:
            recorder.load_state_dict(checkpoint["estimation"])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        policy.load_state_dict(checkpoint["policy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        # The plan in force when the checkpoint was written (a fresh plan could differ: it measures live RSS).
        caps = _caps_from_state(checkpoint["caps"])
        if checkpoint["batch_size"] != order.batch_size:
            order = BatchOrder(len(train_samples), checkpoint["batch_size"], config.seed)
            total_steps = _total_steps(config, order)
        scaler.load_state_dict(checkpoint["scaler"])
        if guard is not None and checkpoint.get("guard"):
            guard.load_state_dict(checkpoint["guard"])
        first_step = int(checkpoint["step"])
    elif config.resume is False:
        for _, path in checkpoints(run_dir):  # starting over: a stale checkpoint must not be resumed later
            path.with_suffix(".sha256").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    _truncate_metrics(metrics_path, first_step)

    start = {"event": "start", "method": config.method, "model": config.model, "steps": total_steps,
             "batch_size": order.batch_size, "precision": precision, "device": device,
             "profile": profile.name if profile else None, "train_images": len(train_samples),
             "val_images": len(val_samples), "classes": folder.classes, "run_dir": str(run_dir),
             "resumed_from_step": first_step}
    atomic_write_json(run_dir / "config.json", {"config": config.to_dict(), "resolved": start})
    emit(start)

    def save(step: int) -> None:
        state = {"format": 1, "step": step, "config": config.resume_key(), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "policy": policy.state_dict(), "rng": {"torch": torch.get_rng_state()}, "history": history,
                 "caps": _caps_state(caps), "batch_size": order.batch_size, "scaler": scaler.state_dict(),
                 "guard": guard.state_dict() if guard else None, "pruning": pruning,
                 "estimation": recorder.state_dict() if recorder is not None else None}
        try:
            path = save_checkpoint(run_dir, step, state)
            emit({"event": "checkpoint", "step": step, "path": str(path)})
        except OSError as e:  # e.g. disk full: the previous checkpoint is untouched, training goes on
            emit({"event": "warning", "message": f"checkpoint at step {step} not written ({e}); "
                                                  "the previous checkpoint is kept"})

    # ---------------------------------------------------------------- training loop
    interrupted = False
    last_save = time.monotonic()
    model.train()
    with open(metrics_path, "a") as metrics:
        for step in range(first_step, total_steps):
            if recorder is not None and step == estimation_steps:
                # ---- Light-PEFT stage 2: prune by the estimates, then stage 3 on the smaller model
                pruning = plan_pruning(model, config.light_peft, recorder)
                recorder.stop()
                recorder = None
                flop_counter, handle, policy, optimizer, scheduler = _prune(model, handle, pruning, config, depth,
                                                                            caps, total_steps, estimation_steps)
                trim_heap()
                pruned = _pruning_summary(model, pruning, base_params)
                # "step": the first step that trains the pruned model (a resume before it re-runs the pruning and
                # drops this line with the steps after its checkpoint)
                event = {"event": "prune", "step": step + 1, **pruned}
                metrics.write(json.dumps(event) + "\n")
                emit(event)
            t0 = time.perf_counter()
            plan = policy.decide(caps)
            handle.set_plan(plan)
            x, y = load_batch(train_samples, order.indices(step), preprocess)
            x, y = x.to(device), y.to(device)
            if recorder is not None:
                recorder.before_forward(step)
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            objective, penalty = loss, None
            if recorder is not None and config.light_peft.mask_l1 > 0:  # Light-PEFT's L1 on the masks
                penalty = config.light_peft.mask_l1 * mask_penalty(model)
                objective = loss + penalty
            scaler.scale(objective).backward()
            if recorder is not None and recorder.recording(step):
                scaler.unscale_(optimizer)  # rank importances need true gradients (a no-op unless fp16)
                recorder.after_backward(step)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            policy.observe(handle.step_deltas())
            if config.trim_memory:
                trim_heap()
            if guard is not None:  # near the ceiling: tighten the caps for the steps that follow
                # On CUDA (Jetson: unified memory) tensors live outside the process RSS: add the allocator's peak.
                reading = peak_rss_bytes() + (torch.cuda.max_memory_allocated() if device == "cuda" else 0)
                caps, guard_event = guard.check(reading, caps)
                if guard_event is not None:
                    guard_event["step"] = step + 1
                    metrics.write(json.dumps(guard_event) + "\n")
                    emit(guard_event)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0

            flops = flop_counter.step_flops(len(y), config.img_size, handle.tokens_in, plan.trainable,
                                            train_embeddings=train_embeddings, keep_ratios=plan.keep_ratios,
                                            train_final_norm=config.method != "head", recompute=plan.recompute)
            history["step_seconds"].append(seconds)
            history["step_flops"].append(flops)
            history["losses"].append(float(loss.detach()))
            record = {
                "event": "step", "step": step + 1, "steps": total_steps, "loss": history["losses"][-1],
                "lr": scheduler.get_last_lr()[0], "time/step_seconds": seconds, "flops/step": flops,
                "tokens/per_block": list(handle.tokens_in),
                "blocks/trainable": [i for i, t in enumerate(plan.trainable) if t],
                "budget/keep_ratio": [round(r, 6) for r in plan.keep_ratios],
                "mem/rss_bytes": rss_bytes(), "mem/peak_rss_bytes": peak_rss_bytes(),
            }
            if penalty is not None:  # "loss" stays the cross-entropy, comparable across methods
                record["loss/mask_l1"] = float(penalty.detach())
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            emit(record)
            done = step + 1
            if should_stop is not None and should_stop() and done < total_steps:
                metrics.flush()
                save(done)
                interrupted = True
                break
            due_steps = config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
            due_time = (config.checkpoint_every_seconds is not None
                        and time.monotonic() - last_save >= config.checkpoint_every_seconds)
            if (due_steps or due_time) and done < total_steps:
                metrics.flush()
                save(done)
                last_save = time.monotonic()

    if interrupted:
        handle.remove()
        result = {"interrupted": True, "resumable": True, "steps": len(history["losses"]), "total_steps": total_steps}
        emit({"event": "interrupted", **result})
        return TrainResult(summary=result, run_dir=run_dir)

    # ---------------------------------------------------------------- evaluation (all tokens, no budgets)
    handle.set_plan(None)
    val_accuracy, val_loss = evaluate(model, val_samples, preprocess, config.eval_batch_size or order.batch_size,
                                      device, autocast)
    emit({"event": "eval", "val_accuracy": val_accuracy, "val_loss": val_loss, "val_images": len(val_samples)})
    handle.remove()
    from .export import save_model

    trainable_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    merge_lora(model)  # adapters folded into the weights: the saved and exported model is timm's architecture
    save_model(model, run_dir)  # the tuned weights, for `export` and `eval` (atomic)

    # ---------------------------------------------------------------- summary
    step_seconds, step_flops, losses = history["step_seconds"], history["step_flops"], history["losses"]
    warm = min(5, len(step_seconds) // 5)  # the first steps pay for allocator growth and first-touch pages
    steady = step_seconds[warm:] or step_seconds
    summary = {
        "edge_alast_version": __version__,
        "method": config.method,
        "model": config.model,
        "profile": profile.name if profile else None,
        "device": device,
        "precision": precision,
        "batch_size": order.batch_size,
        "img_size": config.img_size,
        "steps": len(step_seconds),
        "final_loss": losses[-1] if losses else None,
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "mean_step_seconds": sum(steady) / len(steady),
        "peak_rss_bytes": peak_rss_bytes(),
        "train_flops_per_step": sum(step_flops) / len(step_flops),
        "total_train_flops": int(sum(step_flops)),
        "budgets": list(getattr(policy, "budgets", [1.0] * depth)),
        "trainable_params": trainable_params,
        "base_params": sum(p.numel() for p in model.parameters()),
        "base_params_original": base_params,
        "pruning": pruned,
        "memory_ceiling_bytes": run_plan.memory_ceiling_bytes if run_plan else None,
        "predicted_peak_bytes": run_plan.predicted_peak_bytes if run_plan else None,
        "flop_ceiling_per_step": run_plan.flop_ceiling_per_step if run_plan else None,
        "predicted_flops_per_step": run_plan.predicted_flops_per_step if run_plan else None,
        "planner_notes": list(run_plan.notes) if run_plan else [],
        "classes": folder.classes,
        "warnings": warnings,
    }
    if device == "cuda":
        summary["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    atomic_write_json(run_dir / "summary.json", summary)
    if config.export:
        from .export import export_run

        # The export rebuilds the model from model.safetensors: free the training state first (weights, grads,
        # optimizer moments), so the export's peak does not stack on top of it on a small device.
        optimizer.state.clear()
        optimizer.param_groups.clear()
        del model, handle, optimizer, scheduler
        trim_heap()
        manifest = export_run(run_dir)  # model.onnx + manifest.json, parity-checked in onnxruntime
        emit({"event": "export", "path": str(run_dir / "model.onnx"), "sha256": manifest.get("sha256")})
    emit({"event": "done", **{k: summary[k] for k in ("steps", "val_accuracy", "mean_step_seconds",
                                                        "peak_rss_bytes", "train_flops_per_step")}})
    return TrainResult(summary=summary, run_dir=run_dir)


def _stage(model, config: TrainConfig, depth: int, caps: PolicyCaps, total_steps: int, *, alast: bool,
           first_step: int = 0):
    """Patch, policy, optimizer and LR schedule for training ``model`` from ``first_step`` on (a Light-PEFT run
    builds a second set for its pruned model)."""
    if alast:
        policy = AlastPolicy(depth, config.alast, lr=config.lr)
    else:
        policy = StaticPolicy(depth, train_blocks=config.method != "head", recompute=caps.recompute)
    handle = apply_patch(model, token_multiple=config.token_multiple)  # records what can train (requires_grad)
    # One optimizer over every parameter that can ever train, created once per stage: freezing leaves grads None
    # so the optimizer skips those parameters and keeps their state (never edits param groups).
    trainable_ever = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable_ever if p.ndim > 1 and not n.startswith(EMBEDDING_PARAMS)]
    no_decay = [p for n, p in trainable_ever if not (p.ndim > 1 and not n.startswith(EMBEDDING_PARAMS))]
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls([{"params": decay, "weight_decay": config.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    factor = _lr_lambda(config, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s + first_step))
    return handle, policy, optimizer, scheduler


def _prune(model, handle, pruning: dict, config: TrainConfig, depth: int, caps: PolicyCaps, total_steps: int,
           estimation_steps: int):
    """Light-PEFT stage 2 on ``model`` (patch removed first), then stage 3's FLOP counter, patch, policy, optimizer
    and schedule for the smaller model."""
    handle.remove()
    apply_pruning(model, pruning)
    flop_counter = StepFlopCounter(model)
    return (flop_counter, *_stage(model, config, depth, caps, total_steps, alast=config.method in ALAST_METHODS,
                                  first_step=estimation_steps))


def _pruning_summary(model, pruning: dict, base_params: int) -> dict:
    """What Light-PEFT's stage 2 kept, for the prune event and the summary (``model``: the pruned model)."""
    ranks = {n: len(r) for n, r in pruning["adapters"].items()}
    return {"heads_per_block": [len(h) for h in pruning["heads"]],
            "ffn_units_per_block": [len(u) for u in pruning["units"]],
            "adapters_kept": len(ranks), "lora_ranks_kept": sum(ranks.values()), "adapter_ranks": ranks,
            "base_params_kept": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "base_params_original": base_params}


def _total_steps(config: TrainConfig, order: BatchOrder) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil((config.epochs or 1.0) * order.batches_per_epoch))


def _caps_state(caps: PolicyCaps) -> dict:
    """Caps as plain values (checkpoints load with ``weights_only=True``)."""
    return {"max_keep": None if caps.max_keep is None else list(caps.max_keep), "max_trainable": caps.max_trainable,
            "lowest_trainable": caps.lowest_trainable,
            "recompute": None if caps.recompute is None else list(caps.recompute)}


def _caps_from_state(state: dict) -> PolicyCaps:
    as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
    return PolicyCaps(max_keep=as_tuple(state["max_keep"]), max_trainable=state["max_trainable"],
                      lowest_trainable=state["lowest_trainable"], recompute=as_tuple(state["recompute"]))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the resumed checkpoint (steps that will be run again), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line cut by power loss
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _lr_lambda(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "cosine":
            t = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return factor


@torch.no_grad()
def evaluate(model, samples, preprocess, batch_size: int, device: str, autocast=None) -> tuple[float | None, float | None]:
    """Accuracy and mean loss over ``samples`` with every token (eval mode)."""
    if not samples:
        return None, None
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for x, y in iter_batches(samples, batch_size, preprocess):
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(samples), loss_sum / len(samples)
