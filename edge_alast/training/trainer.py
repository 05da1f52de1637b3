"""The training loop: policy decides the step plan -> mechanism applies it -> forward/backward/step -> policy
observes. Set-up lives in :mod:`edge_alast.training.run`, stages in :mod:`edge_alast.training.stage`; this module reads top to
bottom as the loop it is, and no callbacks do the real work.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..device.allocator import allocator_in_use
from ..atomic import atomic_write_json
from .checkpoint import save_checkpoint
from ..config import TrainConfig
from ..errors import ConfigError
from ..data.loader import iter_batches
from ..adapters.lightpeft import mask_penalty
from ..adapters.lora import merge_lora
from ..device.memory import PeakTracker, rss_bytes, trim_heap
from ..runfolder import save_model, steady, truncate_metrics
from ..device.precision import autocast as autocast_for
from .run import make_loader, setup_run
from .stage import first_stage, next_stage, pruning_summary

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What a run produced. ``trainable`` and ``policy_state`` (with ``return_state=True``): the tensors of every
    parameter that could train, as trained (LoRA adapters unmerged), and the policy's state, e.g. for a fleet."""

    summary: dict[str, Any]
    run_dir: Path
    trainable: dict[str, torch.Tensor] | None = None
    policy_state: dict | None = None


def train(config: TrainConfig, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, *, start: dict | None = None,
          return_state: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run folder ``config.out``.

    Args:
        config: The run configuration.
        on_event: Called with each event dict (start, step, warning, eval, done); library code never prints.
        should_stop: Polled after each step; True checkpoints and returns at once (summary ``interrupted``;
            running again with the same config resumes exactly).
        start: Where to start instead of ``config.weights`` alone (a fleet round): ``trainable``, tensors by
            parameter name for (a subset of) what can train, loaded over the weights; ``policy``, a policy state
            (ALaST budgets carried from this node's previous round).
        return_state: Also return the trainable tensors and the policy state (:class:`TrainResult`).

    Returns:
        The summary (as written to ``summary.json``) and the run folder.
    """
    emit = on_event or (lambda event: None)

    # ---------------------------------------------------------------- set-up
    run = setup_run(config)
    for message in run.warnings + run.resume_notes:
        emit({"event": "warning", "message": message})
    for note in run.plan.notes if run.plan else []:
        emit({"event": "plan", "message": note})
    model, device = run.model, run.device
    stage = first_stage(run)
    if start is not None:  # a fleet round: the global model's trainable tensors, this node's budgets
        _load_trainable(model, stage.trainable, start.get("trainable") or {})
        if start.get("policy"):
            stage.policy.load_state_dict(start["policy"])
    # Decodes the next batches in the background; leaves out, names and counts files that fail to decode.
    loader = make_loader(run, on_warning=lambda message: emit({"event": "warning", "message": message}))
    autocast = autocast_for(device, run.precision)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device, enabled=run.precision == "fp16")
    caps, history, first_step = run.caps, {"step_seconds": [], "step_flops": [], "losses": []}, 0

    # ---------------------------------------------------------------- resume
    if run.checkpoint is not None:
        checkpoint, run.checkpoint = run.checkpoint, None  # no second copy of the weights once restored
        if checkpoint.get("pruning") is not None:  # written after Light-PEFT's pruning: prune first
            stage = next_stage(run, stage, pruning=checkpoint["pruning"])
        model.load_state_dict(checkpoint["model"])
        stage.load_state_dict(checkpoint)
        if checkpoint.get("bad_images"):  # files found unreadable before the checkpoint stay left out
            run.bad_images.load_state_dict(checkpoint["bad_images"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        first_step = int(checkpoint["step"])
        del checkpoint
    metrics_path = run.run_dir / "metrics.jsonl"
    truncate_metrics(metrics_path, first_step)

    start = {"event": "start", "method": config.method, "model": config.model, "steps": run.total_steps,
             "batch_size": run.order.batch_size, "precision": run.precision, "allocator": allocator_in_use(),
             "device": device,
             "profile": run.profile.name if run.profile else None, "train_images": len(run.train_samples),
             "val_images": len(run.val_samples), "classes": run.classes, "run_dir": str(run.run_dir),
             "resumed_from_step": first_step}
    atomic_write_json(run.run_dir / "config.json", {"config": config.to_dict(), "resolved": start})
    emit(start)

    def save(step: int) -> None:
        state = {"format": CHECKPOINT_FORMAT, "step": step, "config": config.resume_key(run.precision),
                 "model": model.state_dict(), **stage.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}, "history": history, "caps": caps.state_dict(),
                 "batch_size": run.order.batch_size, "scaler": scaler.state_dict(),
                 "guard": run.guard.state_dict() if run.guard else None,
                 "bad_images": run.bad_images.state_dict()}
        try:
            path = save_checkpoint(run.run_dir, step, state)
            emit({"event": "checkpoint", "step": step, "path": str(path)})
        except OSError as e:  # e.g. disk full: the previous checkpoint is untouched, training goes on
            emit({"event": "warning", "message": f"checkpoint at step {step} not written ({e}); "
                                                  "the previous checkpoint is kept"})

    # ---------------------------------------------------------------- training loop
    interrupted = False
    peaks = PeakTracker()
    peaks.interval_peak()  # from here on, each reading is one step's own peak
    last_save = time.monotonic()
    model.train()
    with open(metrics_path, "a") as metrics:
        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")
            emit(record)

        for step in range(first_step, run.total_steps):
            if step == stage.end_step:
                # ---- Light-PEFT: prune by the estimates, then fine-tune the smaller model
                stage = next_stage(run, stage)
                # "step": the first step that trains the pruned model (a resume before it re-runs the pruning and
                # drops this line with the steps after its checkpoint)
                log({"event": "prune", "step": step + 1, **pruning_summary(model, stage.pruning, run.base_params)})
            t0 = time.perf_counter()
            plan = stage.policy.decide(caps)
            budgets = stage.policy.budgets
            stage.handle.set_plan(plan)
            x, y = loader.get(step)
            if len(y) == 0:  # every file of this batch failed to decode: no update; step s+1 still reads batch s+1
                continue
            x, y = x.to(device), y.to(device)
            recorder = stage.recorder
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
                scaler.unscale_(stage.optimizer)  # rank importances need true gradients (a no-op unless fp16)
                recorder.after_backward(step)
            scaler.step(stage.optimizer)
            scaler.update()
            stage.optimizer.zero_grad(set_to_none=True)
            stage.scheduler.step()
            stage.policy.observe(stage.handle.step_deltas(), stage.handle.step_streams())
            if config.trim_memory:
                trim_heap()
            step_peak = peaks.interval_peak()  # this step's own peak (the lifetime mark never falls)
            if device == "cuda":  # Jetson (unified memory): tensors live outside the process RSS
                step_peak += torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if run.guard is not None:  # near the ceiling: the caps for the steps that follow
                caps, guard_event = run.guard.check(step_peak, caps)
                if guard_event is not None:
                    log({**guard_event, "step": step + 1})
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0

            trainable = stage.trainable
            flops = stage.flop_counter.step_flops(len(y), config.img_size, stage.handle.tokens_in, plan.trainable,
                                                  train_embeddings=trainable.embeddings, keep_ratios=plan.keep_ratios,
                                                  train_final_norm=trainable.final_norm, recompute=plan.recompute)
            history["step_seconds"].append(seconds)
            history["step_flops"].append(flops)
            history["losses"].append(float(loss.detach()))
            record = {
                "event": "step", "step": step + 1, "steps": run.total_steps, "loss": history["losses"][-1],
                "lr": stage.scheduler.get_last_lr()[0], "time/step_seconds": seconds, "flops/step": flops,
                "tokens/per_block": list(stage.handle.tokens_in),
                "blocks/trainable": [i for i, t in enumerate(plan.trainable) if t],
                "plan/keep_ratio": [round(r, 6) for r in plan.keep_ratios],
                "budget/raw": [round(b, 6) for b in budgets],
                "mem/rss_bytes": rss_bytes(), "mem/step_peak_bytes": step_peak,
                "mem/peak_rss_bytes": peaks.lifetime_peak(),
            }
            if penalty is not None:  # "loss" stays the cross-entropy, comparable across methods
                record["loss/mask_l1"] = float(penalty.detach())
            log(record)
            done = step + 1
            if config.eval_every and done % config.eval_every == 0:  # a point of the validation curve
                stage.handle.set_plan(None)
                accuracy, val_loss = evaluate(model, run.eval_samples, run.preprocess, run.eval_batch_size, device,
                                              autocast, bad=run.val_bad_images, on_warning=loader.on_warning)
                log({"event": "eval", "step": done, "val_accuracy": accuracy, "val_loss": val_loss,
                     "val_images": len(run.eval_samples), "elapsed_seconds": sum(history["step_seconds"]),
                     "flops_total": int(sum(history["step_flops"]))})
            metrics.flush()
            if should_stop is not None and should_stop() and done < run.total_steps:
                metrics.flush()
                save(done)
                interrupted = True
                break
            due_steps = config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
            due_time = (config.checkpoint_every_seconds is not None
                        and time.monotonic() - last_save >= config.checkpoint_every_seconds)
            if (due_steps or due_time) and done < run.total_steps:
                metrics.flush()
                save(done)
                last_save = time.monotonic()

    loader.close()
    if interrupted:
        stage.close()
        result = {"interrupted": True, "resumable": True, "steps": len(history["losses"]),
                  "total_steps": run.total_steps}
        emit({"event": "interrupted", **result})
        return TrainResult(summary=result, run_dir=run.run_dir)

    train_peak = peaks.lifetime_peak()  # the training loop's own peak; evaluation, saving and export come next

    # ---------------------------------------------------------------- evaluation (all tokens, no budgets)
    stage.handle.set_plan(None)
    val_accuracy, val_loss = evaluate(model, run.val_samples, run.preprocess, run.eval_batch_size, device, autocast,
                                      bad=run.val_bad_images,
                                      on_warning=lambda message: emit({"event": "warning", "message": message}))
    emit({"event": "eval", "val_accuracy": val_accuracy, "val_loss": val_loss, "val_images": len(run.val_samples)})
    stage.close()

    trainable_params = stage.trainable_params
    state = ({n: p.detach().clone() for n, p in stage.trainable.parameters(model)} if return_state else None)
    policy_state = stage.policy.state_dict() if return_state else None
    pruned = pruning_summary(model, stage.pruning, run.base_params) if stage.pruning else None
    merge_lora(model)  # adapters folded into the weights: the saved and exported model is timm's architecture
    save_model(model, run.run_dir)  # the tuned weights, for `export` and `eval` (atomic)

    # ---------------------------------------------------------------- summary
    plan_ = run.plan
    summary = {
        "edge_alast_version": __version__,
        "method": config.method,
        "model": config.model,
        "profile": run.profile.name if run.profile else None,
        "device": device,
        "precision": run.precision,
        "allocator": allocator_in_use(),
        "batch_size": run.order.batch_size,
        "img_size": config.img_size,
        "eval_transform": run.preprocess.eval_transform,  # export/eval/predict reproduce it (old runs: squash)
        "steps": len(history["step_seconds"]),
        "final_loss": history["losses"][-1] if history["losses"] else None,
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "mean_step_seconds": sum(steady(history["step_seconds"])) / len(steady(history["step_seconds"])),
        "peak_rss_bytes": peaks.lifetime_peak(),  # the whole process; rewritten after the export
        "train_peak_rss_bytes": train_peak,
        "train_flops_per_step": sum(history["step_flops"]) / len(history["step_flops"]),
        "total_train_flops": int(sum(history["step_flops"])),
        "budgets": list(stage.policy.budgets),
        "trainable_params": trainable_params,
        "base_params": sum(p.numel() for p in model.parameters()),
        "base_params_original": run.base_params,
        "pruning": pruned,
        "memory_ceiling_bytes": plan_.memory_ceiling_bytes if plan_ else None,
        "predicted_peak_bytes": plan_.predicted_peak_bytes if plan_ else None,  # the whole process
        "predicted_train_peak_bytes": plan_.predicted_train_peak_bytes if plan_ else None,
        "flop_ceiling_per_step": plan_.flop_ceiling_per_step if plan_ else None,
        "predicted_flops_per_step": plan_.predicted_flops_per_step if plan_ else None,
        "planner_notes": list(plan_.notes) if plan_ else [],
        "alast_update": run.alast.update if run.spec.alast else None,
        "baseline": run.baseline,
        "classes": run.classes,
        "warnings": run.warnings,
    }
    if device == "cuda":
        summary["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    atomic_write_json(run.run_dir / "summary.json", summary)

    # ---------------------------------------------------------------- export
    if config.export:
        from ..deploy.export import export_run

        # The export rebuilds the model from model.safetensors: free the training state first (weights, grads,
        # optimizer moments), so the export's peak does not stack on top of it on a small device.
        stage.free()
        del model, stage, run
        trim_heap()
        before_export = rss_bytes()
        peaks.interval_peak()
        manifest = export_run(config.out)  # model.onnx + manifest.json, parity-checked in onnxruntime
        emit({"event": "export", "path": str(Path(config.out) / "model.onnx"), "sha256": manifest.get("sha256")})
        summary.update(rss_before_export_bytes=before_export, export_peak_rss_bytes=peaks.interval_peak())
        summary["peak_rss_bytes"] = peaks.lifetime_peak()
        atomic_write_json(Path(config.out) / "summary.json", summary)
    emit({"event": "done", **{k: summary[k] for k in ("steps", "val_accuracy", "mean_step_seconds",
                                                        "peak_rss_bytes", "train_flops_per_step")}})
    return TrainResult(summary=summary, run_dir=Path(config.out), trainable=state, policy_state=policy_state)


def _load_trainable(model, trainable, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of the same names, each one that can train (named errors)."""
    params = dict(trainable.parameters(model))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"start: {len(unknown)} tensors are not trainable parameters of this run "
                          f"({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''})")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ConfigError(f"start: {name} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(value)


@torch.no_grad()
def evaluate(model, samples, preprocess, batch_size: int, device: str, autocast=None, bad=None,
             on_warning=None) -> tuple[float | None, float | None]:
    """Accuracy and mean loss over ``samples`` with every token (eval mode), never augmented.

    Args:
        bad: An :class:`~edge_alast.data.images.BadImages`: files that fail to decode are left out (accuracy and loss
            are over the images evaluated), named through ``on_warning`` and counted against its limit (DataError
            above it). None: such a file raises DataError.
    """
    if not samples:
        return None, None
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for x, y in iter_batches(samples, batch_size, preprocess, bad=bad, on_warning=on_warning):
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    model.train(was_training)
    if not count:
        return None, None
    return correct / count, loss_sum / count
