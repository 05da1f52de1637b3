"""The training loop: policy decides the step plan -> mechanism applies it -> forward/backward/step -> policy
observes. Set-up lives in :mod:`edge_alast.training.run`, stages in :mod:`edge_alast.training.stage`, the objective's
penalties in :mod:`edge_alast.training.objective`, evaluation in :mod:`edge_alast.training.evaluate`; this module
reads top to bottom as the loop it is, and no callbacks do the real work.

:func:`train` reads set-up -> resume -> loop -> evaluate -> save -> summary -> export. What the loop carries from
step to step is a :class:`LoopState`; a checkpoint is named state: the model, the stage, the loop state, the guard,
the unreadable files and the RNG (:func:`_checkpoint`, restored by :func:`_restore`).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..adapters.lora import merge_lora
from ..alast.baselines import SCHEDULE, schedule_of
from ..alast.policy import PolicyCaps, anneal_plan, anneal_progress
from ..atomic import atomic_write_json, open_nofollow
from ..config import TrainConfig
from ..device.allocator import allocator_in_use
from ..device.host import cpu_wait_seconds
from ..device.memory import PeakTracker, rss_bytes, trim_heap
from ..device.precision import autocast as autocast_for
from ..errors import ConfigError, NonFiniteError
from ..methods import METHODS
from ..model.trainable import load_trainable
from ..runfolder import METRICS_FILE, metric, read_metrics, save_model, steady, truncate_metrics
from .checkpoint import checkpoints, save_checkpoint
from .evaluate import evaluate
from .objective import ProximalTerm, penalties
from .run import Run, make_loader, setup_run
from .stage import Stage, first_stage, next_stage, pruning_summary
from .stopping import PLATEAU, annealed_end, curve_start, stop_reason

CHECKPOINT_FORMAT = 1
HISTORY = ("step_seconds", "step_flops", "losses", "step_peak_bytes")
START_KEYS = ("trainable", "policy", "proximal_mu")


@dataclass
class TrainResult:
    """What a run produced. ``history``: per step run, as :class:`LoopState` keeps it; ``train_images``: the
    training images of the run. ``trainable`` and ``policy_state`` (with ``return_state=True``): the tensors of every
    parameter that could train, as trained (LoRA adapters unmerged), and the policy's state, e.g. for a fleet."""

    summary: dict[str, Any]
    run_dir: Path
    trainable: dict[str, torch.Tensor] | None = None
    policy_state: dict | None = None
    history: dict[str, list] = field(default_factory=dict)
    train_images: int = 0


@dataclass
class LoopState:
    """What the training loop carries from step to step (checkpointed as it is).

    Attributes:
        caps: The caps in force: the plan's (or the resumed checkpoint's), as the memory guard tightens and relaxes
            them.
        scaler: fp16's loss scaler (disabled, a no-op, for bf16 and fp32).
        step: Steps done: the next step to run.
        history: Per step run, in order: ``step_seconds``, ``step_flops``, ``losses`` (the cross-entropy) and
            ``step_peak_bytes``.
        curve: The ``--eval-every`` validation accuracies the stop rules read (Light-PEFT: those after pruning).
        end_step: Where an annealing ALaST run that plateaued ends (it anneals from the plateau up to it); None:
            the run's last step.
    """

    caps: PolicyCaps
    scaler: torch.amp.GradScaler
    step: int = 0
    history: dict[str, list] = field(default_factory=lambda: {k: [] for k in HISTORY})
    curve: list[float] = field(default_factory=list)
    end_step: int | None = None

    def record(self, step: int, seconds: float, flops: float, loss: float, peak_bytes: int) -> None:
        """Step ``step`` is done."""
        for key, value in zip(HISTORY, (seconds, flops, loss, peak_bytes)):
            self.history[key].append(value)
        self.step = step + 1

    @property
    def flops_spent(self) -> float:
        """Training FLOPs of the steps run so far (what ``--max-tflops`` caps and the validation points report)."""
        return sum(self.history["step_flops"])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "caps": self.caps.state_dict(), "scaler": self.scaler.state_dict(),
                "history": {k: list(v) for k, v in self.history.items()}, "curve": list(self.curve),
                "end_step": self.end_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.caps = PolicyCaps.from_state(state["caps"])
        self.scaler.load_state_dict(state["scaler"])
        # step_peak_bytes: absent from checkpoints written before it was kept (those steps' peaks are not known)
        self.history = {k: list(state["history"].get(k, ())) for k in HISTORY}
        # curve: absent from checkpoints written before the stop rules (a plateau is then read from the resume on)
        self.curve = [float(a) for a in state.get("curve", ())]
        self.end_step = state.get("end_step")


def train(config: TrainConfig, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, *, start: dict | None = None,
          return_state: bool = False, should_finish: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run folder ``config.out``.

    Args:
        config: The run configuration.
        on_event: Called with each event dict (start, step, warning, eval, done); library code never prints.
        should_stop: Polled after each step; True checkpoints and returns at once (summary ``interrupted``;
            running again with the same config resumes exactly).
        start: Where to start instead of ``config.weights`` alone (a fleet round): ``trainable``, tensors by
            parameter name for (a subset of) what can train, loaded over the weights; ``policy``, a policy state
            (ALaST budgets carried from this node's previous round); ``proximal_mu``, FedProx's mu: the objective
            adds ``mu/2 * |w - w_start|^2`` over the trainable tensors (metric ``loss/proximal``).
        return_state: Also return the trainable tensors and the policy state (:class:`TrainResult`).
        should_finish: Polled after each step; True ends the run there as a finished one (evaluated, saved,
            summary ``finished_early_at`` = the steps done, ``finished_by`` = ``signal``), e.g. on SIGUSR1. The
            config's stop rules (``stop_at_plateau``, ``max_tflops``) end it the same way, at the step they read
            (``finished_by``: ``plateau``, ``budget``).

    Returns:
        The summary (as written to ``summary.json``), the run folder and the loop's history.
    """
    emit = on_event or (lambda event: None)

    def warn(message: str) -> None:
        emit({"event": "warning", "message": message})

    # ---------------------------------------------------------------- set-up
    run = setup_run(config)
    for message in run.warnings + run.resume_notes:
        warn(message)
    for note in run.plan.notes if run.plan else []:
        emit({"event": "plan", "message": note})
    stage = first_stage(run)
    proximal = _start_from(start, run, stage) if start is not None else None
    # Decodes the next batches in the background; leaves out, names and counts files that fail to decode.
    loader = make_loader(run, on_warning=warn)
    autocast = autocast_for(run.device, run.precision)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    loop = LoopState(caps=run.caps, scaler=torch.amp.GradScaler(run.device, enabled=run.precision == "fp16"))
    train_images = len(run.train_samples)

    # ---------------------------------------------------------------- resume
    if run.checkpoint is not None:
        checkpoint, run.checkpoint = run.checkpoint, None  # no second copy of the weights once restored
        stage = _restore(run, stage, loop, checkpoint)
        del checkpoint
    metrics_path = run.run_dir / METRICS_FILE
    truncate_metrics(metrics_path, loop.step)
    started = _start_event(config, run, loop.step)
    atomic_write_json(run.run_dir / "config.json", {"config": config.to_dict(), "resolved": started})
    emit(started)

    # ---------------------------------------------------------------- training loop
    interrupted, finished_early, finished_by = False, None, None
    curve_from = curve_start(config.method, config.light_peft.estimation_steps)
    # Trimming the heap each step keeps RSS between steps low, which a memory ceiling's guard needs; without a
    # ceiling it only costs time (the freed pages are faulted in again by the next step).
    trim = config.trim_memory if config.trim_memory is not None else run.guard is not None
    peaks = PeakTracker()
    peaks.interval_peak()  # from here on, each reading is one step's own peak
    last_save = time.monotonic()
    run.model.train()
    try:
        with os.fdopen(open_nofollow(metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as metrics:
            def log(record: dict) -> None:
                metrics.write(json.dumps(record) + "\n")
                emit(record)

            for step in range(loop.step, run.total_steps):
                if step == stage.end_step:
                    # ---- Light-PEFT: prune by the estimates, then fine-tune the smaller model
                    stage = next_stage(run, stage)
                    # "step": the first step that trains the pruned model (a resume before it re-runs the pruning and
                    # drops this line with the steps after its checkpoint)
                    log({"event": "prune", "step": step + 1,
                         **pruning_summary(run.model, stage.pruning, run.base_params)})
                t0, waited_before = time.perf_counter(), cpu_wait_seconds()
                plan = stage.policy.decide(loop.caps)
                # alast.anneal_last: over the run's last steps, keep ratios rise to 1 (a function of the step alone)
                # (a plateau brings the end forward: loop.end_step)
                plan = anneal_plan(plan, anneal_progress(step, loop.end_step or run.total_steps,
                                                         run.alast.anneal_last), loop.caps)
                budgets = stage.policy.budgets  # as decided: observe() replaces them
                stage.handle.set_plan(plan)
                x, y = loader.get(step)
                if len(y) == 0:  # every file of this batch failed to decode: no update; step s+1 reads batch s+1
                    continue
                t_data = time.perf_counter()
                loss, terms = _forward_backward_step(run, stage, loop.scaler, autocast, x.to(run.device),
                                                     y.to(run.device), step, proximal)
                t_compute = time.perf_counter()
                plan = stage.handle.applied_plan()  # live budgets (coauthors) moved the keep ratios within the forward
                stage.policy.observe(stage.handle.step_deltas(stage.policy.delta_reduction),
                                     stage.handle.step_streams())
                if trim:
                    trim_heap()
                step_peak = _step_peak(peaks, run.device)
                if run.guard is not None:  # near the ceiling: the caps for the steps that follow
                    loop.caps, guard_event = run.guard.check(step_peak, loop.caps, stage.policy)
                    if guard_event is not None:
                        log({**guard_event, "step": step + 1})
                if run.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                loop.record(step, seconds, _step_flops(stage, plan, len(y), config.img_size), float(loss.detach()),
                            step_peak)
                log({**_step_record(run, stage, loop, plan, budgets, terms, peaks),
                     # where the step's time went: waiting for the batch (plan + loader), forward + backward +
                     # optimizer (on CUDA: until the kernels are queued), and the rest (policy update, memory
                     # readings, guard)
                     "time/data_seconds": t_data - t0, "time/compute_seconds": t_compute - t_data,
                     # and how much of it the CPU ran another process (a contended benchmark, not a slow step)
                     **_wait_record(waited_before, cpu_wait_seconds())})
                # a point of the validation curve: every --eval-every steps, and where --max-tflops is spent (the
                # run ends there, so its curve ends on the step the budget ran out)
                evaluated = bool(config.eval_every) and (loop.step % config.eval_every == 0
                                                         or _over_budget(config, loop))
                if evaluated:
                    point = _validation_point(run, stage, loop, autocast, warn)
                    log(point)
                    if loop.step > curve_from:
                        loop.curve.append(point["val_accuracy"])
                metrics.flush()
                reason = _end_here(config, run, loop, evaluated, log)  # the stop rules (--stop-at-plateau, ...)
                if reason is None and should_finish is not None and should_finish():
                    reason = "signal"
                if reason is not None and loop.step < run.total_steps:
                    finished_early, finished_by = loop.step, reason
                    log({"event": "finish", "step": loop.step, "steps": run.total_steps, "reason": reason})
                    break
                if should_stop is not None and should_stop() and loop.step < run.total_steps:
                    _save(config, run, stage, loop, emit)
                    interrupted = True
                    break
                if _checkpoint_due(config, loop.step, last_save) and loop.step < run.total_steps:
                    _save(config, run, stage, loop, emit)
                    last_save = time.monotonic()

        if not interrupted:  # what is evaluated, saved and exported next must be finite
            _check_finite(run.model, f"after step {loop.step}")
    except NonFiniteError as e:  # nothing is evaluated, saved or exported from diverged weights
        loader.close()
        stage.close()
        raise NonFiniteError(f"{e}; nothing was published (no model.safetensors, model.onnx or manifest.json "
                             f"from these weights); {_kept_checkpoint(run)}") from None
    except BaseException:  # e.g. DiskFullError from a checkpoint: stop the loader's threads, then report
        loader.close()
        stage.close()
        raise

    loader.close()
    if interrupted:
        stage.close()
        result = {"interrupted": True, "resumable": True, "steps": len(loop.history["losses"]),
                  "total_steps": run.total_steps}
        emit({"event": "interrupted", **result})
        return TrainResult(summary=result, run_dir=run.run_dir, history=loop.history, train_images=train_images)
    train_peak = peaks.lifetime_peak()  # the training loop's own peak; evaluation, saving and export come next

    # ---------------------------------------------------------------- evaluation (all tokens, no budgets)
    stage.handle.set_plan(None)
    final_samples = run.final_eval_samples  # --eval-images caps it (default: every validation image)
    val_accuracy, val_loss = evaluate(run.model, final_samples, run.preprocess, run.eval_batch_size, run.device,
                                      autocast, bad=run.val_bad_images, on_warning=warn)
    emit({"event": "eval", "val_accuracy": val_accuracy, "val_loss": val_loss, "val_images": len(final_samples)})
    stage.close()

    # ---------------------------------------------------------------- save the tuned model

    trainable = ({n: p.detach().clone() for n, p in stage.trainable.parameters(run.model)} if return_state else None)
    policy_state = stage.policy.state_dict() if return_state else None
    pruned = pruning_summary(run.model, stage.pruning, run.base_params) if stage.pruning else None
    merge_lora(run.model)  # adapters folded into the weights: the saved and exported model is timm's architecture
    save_model(run.model, run.run_dir)  # the tuned weights, for `export` and `eval` (atomic)

    # ---------------------------------------------------------------- summary
    summary = _summary(config, run, stage, loop, val_accuracy, val_loss, pruned, peaks, train_peak)
    summary["finished_early_at"] = finished_early  # a stop rule or should_finish ended the run after this many steps
    summary["finished_by"] = finished_by  # which: plateau, budget or signal (None: it ran all its steps)
    atomic_write_json(run.run_dir / "summary.json", summary)

    # ---------------------------------------------------------------- export
    if config.export:
        # The export rebuilds the model from model.safetensors: free the training state first (weights, grads,
        # optimizer moments), so the export's peak does not stack on top of it on a small device.
        stage.free()
        del stage, run, proximal
        _export(config, summary, peaks, emit)
    emit({"event": "done", **{k: summary[k] for k in ("steps", "val_accuracy", "mean_step_seconds",
                                                        "peak_rss_bytes", "train_flops_per_step")}})
    return TrainResult(summary=summary, run_dir=Path(config.out), trainable=trainable, policy_state=policy_state,
                       history=loop.history, train_images=train_images)


# -------------------------------------------------------------------------------------------- set-up and resume
def _start_from(start: dict, run: Run, stage: Stage) -> ProximalTerm | None:
    """A fleet round's start (see :func:`train`): load the given trainable tensors and policy state; FedProx's
    term, anchored at the tensors the round starts from, or None."""
    unknown = sorted(set(start) - set(START_KEYS))
    if unknown:
        raise ConfigError(f"start: unknown keys {', '.join(unknown)} (known: {', '.join(START_KEYS)})")
    load_trainable(run.model, stage.trainable, start.get("trainable") or {}, source="start")
    if start.get("policy"):
        stage.policy.load_state_dict(start["policy"])
    mu = float(start.get("proximal_mu") or 0.0)
    if not mu:
        return None
    if len(run.spec.stages) > 1:
        raise ConfigError(f"start: proximal_mu needs a one-stage method; {run.config.method} prunes the model "
                          "mid-run, so its tensors no longer match the start")
    return ProximalTerm.at(mu, stage.trainable.parameters(run.model))


def _restore(run: Run, stage: Stage, loop: LoopState, checkpoint: dict[str, Any]) -> Stage:
    """Load the named state of ``checkpoint`` (see :func:`_checkpoint`); returns the stage it was written in."""
    if checkpoint.get("pruning") is not None:  # written after Light-PEFT's pruning: prune first
        stage = next_stage(run, stage, pruning=checkpoint["pruning"])
    run.model.load_state_dict(checkpoint["model"])
    stage.load_state_dict(checkpoint)
    loop.load_state_dict(checkpoint)
    if run.guard is not None and checkpoint.get("guard"):
        run.guard.load_state_dict(checkpoint["guard"])
    if checkpoint.get("bad_images"):  # files found unreadable before the checkpoint stay left out
        run.bad_images.load_state_dict(checkpoint["bad_images"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return stage


def _start_event(config: TrainConfig, run: Run, first_step: int) -> dict:
    return {"event": "start", "method": config.method, "model": config.model, "steps": run.total_steps,
            "batch_size": run.order.batch_size, "precision": run.precision, "allocator": allocator_in_use(),
            "device": run.device, "profile": run.profile.name if run.profile else None,
            "train_images": len(run.train_samples), "val_images": len(run.val_samples), "classes": run.classes,
            "run_dir": str(run.run_dir), "resumed_from_step": first_step,
            "compile": run.compile, "compile_reason": run.compile_reason}


# -------------------------------------------------------------------------------------------- one step
def _forward_backward_step(run: Run, stage: Stage, scaler: torch.amp.GradScaler, autocast, x: torch.Tensor,
                           y: torch.Tensor, step: int, proximal: ProximalTerm | None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward and the optimizer and LR steps under the plan set; returns the cross-entropy and the
    penalties the objective added to it (by metric name)."""
    recorder = stage.recorder
    if recorder is not None:
        recorder.before_forward(step)
    with autocast:
        logits = run.model(x)
    loss = F.cross_entropy(logits.float(), y)
    terms = penalties(run.model, stage, run.config.light_peft.mask_l1, proximal)
    objective = loss
    for term in terms.values():
        objective = objective + term
    value = float(objective.detach())
    if not math.isfinite(value):  # before backward: no step is taken from it
        raise NonFiniteError(f"training diverged at step {step + 1}: the loss is {value} (lower --lr, or check the "
                             "data and --weights)")
    scaler.scale(objective).backward()
    if recorder is not None and recorder.recording(step):
        scaler.unscale_(stage.optimizer)  # rank importances need true gradients (a no-op unless fp16)
        recorder.after_backward(step)
    scaler.step(stage.optimizer)
    scaler.update()
    stage.optimizer.zero_grad(set_to_none=True)
    stage.scheduler.step()
    return loss, terms


def _step_peak(peaks: PeakTracker, device: str) -> int:
    """This step's own peak memory (the lifetime mark never falls)."""
    step_peak = peaks.interval_peak()
    if device == "cuda":  # Jetson (unified memory): tensors live outside the process RSS
        step_peak += torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    return step_peak


def _step_flops(stage: Stage, plan, batch: int, img_size: int) -> float:
    trainable = stage.trainable
    return stage.flop_counter.step_flops(batch, img_size, stage.handle.tokens_in, plan.trainable,
                                         train_embeddings=trainable.embeddings, keep_ratios=plan.keep_ratios,
                                         train_final_norm=trainable.final_norm, recompute=plan.recompute)


def _wait_record(before: float | None, after: float | None) -> dict:
    """``time/wait_seconds``: the step's run-queue wait (:func:`~edge_alast.device.host.cpu_wait_seconds`); absent
    where the kernel keeps no schedstat. Clamped at 0: a thread that exited within the step took its wait along."""
    return {} if before is None or after is None else {"time/wait_seconds": max(0.0, after - before)}


def _step_record(run: Run, stage: Stage, loop: LoopState, plan, budgets: list[float], terms: dict[str, torch.Tensor],
                 peaks: PeakTracker) -> dict:
    """The ``step`` line of ``metrics.jsonl`` for the step just recorded in ``loop``."""
    history = loop.history
    record = {
        "event": "step", "step": loop.step, "steps": run.total_steps, "loss": history["losses"][-1],
        "lr": stage.scheduler.get_last_lr()[0], "time/step_seconds": history["step_seconds"][-1],
        "flops/step": history["step_flops"][-1],
        "flops/per_second": history["step_flops"][-1] / max(history["step_seconds"][-1], 1e-9),
        "tokens/per_block": list(stage.handle.tokens_in),
        "blocks/trainable": [i for i, t in enumerate(plan.trainable) if t],
        "plan/keep_ratio": [round(r, 6) for r in plan.keep_ratios],
        "budget/raw": [round(b, 6) for b in budgets],
        "mem/rss_bytes": rss_bytes(), "mem/step_peak_bytes": history["step_peak_bytes"][-1],
        "mem/peak_rss_bytes": peaks.lifetime_peak(),
    }
    if stage.compiled is not None:  # graphs compiled so far: a rise after the first steps is a recompilation
        record["compile/graphs"] = stage.compiled.graphs
    # "loss" stays the cross-entropy, comparable across methods; each penalty has its own name
    record.update({name: float(term.detach()) for name, term in terms.items()})
    return record


def _budget_flops(config: TrainConfig) -> float | None:
    return config.max_tflops * 1e12 if config.max_tflops is not None else None


def _over_budget(config: TrainConfig, loop: LoopState) -> bool:
    """``--max-tflops`` is spent: checked after every step, so a run overshoots it by less than one step."""
    budget = _budget_flops(config)
    return budget is not None and loop.flops_spent >= budget


def _end_here(config: TrainConfig, run: Run, loop: LoopState, evaluated: bool, log: Callable[[dict], None]
              ) -> str | None:
    """Why the config's stop rules end the run after ``loop.step`` steps (``plateau``, ``budget``), else None. They
    are read at each validation point (after each step without ``--eval-every``; a spent budget makes one). An
    annealing ALaST run that plateaus is not ended there, on its token-dropped view: its end comes forward
    (``loop.end_step``, logged as an ``anneal`` event) and it anneals up to it first."""
    reason = None
    if evaluated or not config.eval_every:
        reason = stop_reason(loop.curve, loop.flops_spent, at_plateau=config.stop_at_plateau,
                             window=config.plateau_window, patience=config.plateau_patience,
                             min_gain=config.plateau_min_gain, max_flops=_budget_flops(config))
    if reason == PLATEAU and METHODS[config.method].alast and run.alast.anneal_last > 0:
        if loop.end_step is None:
            loop.end_step = annealed_end(loop.step, run.total_steps, run.alast.anneal_last)
            log({"event": "anneal", "step": loop.step, "until": loop.end_step})
        reason = None
    if loop.end_step is not None and loop.step >= loop.end_step:
        reason = PLATEAU
    return reason


def _validation_point(run: Run, stage: Stage, loop: LoopState, autocast, on_warning) -> dict:
    """``--eval-every``: accuracy on the fixed validation subset, every token (the next step sets its plan again)."""
    stage.handle.set_plan(None)
    accuracy, val_loss = evaluate(run.model, run.eval_samples, run.preprocess, run.eval_batch_size, run.device,
                                  autocast, bad=run.val_bad_images, on_warning=on_warning)
    return {"event": "eval", "step": loop.step, "val_accuracy": accuracy, "val_loss": val_loss,
            "val_images": len(run.eval_samples), "elapsed_seconds": sum(loop.history["step_seconds"]),
            "flops_total": int(loop.flops_spent)}


# -------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_due(config: TrainConfig, done: int, last_save: float) -> bool:
    due_steps = config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
    due_time = (config.checkpoint_every_seconds is not None
                and time.monotonic() - last_save >= config.checkpoint_every_seconds)
    return bool(due_steps or due_time)


def _checkpoint(config: TrainConfig, run: Run, stage: Stage, loop: LoopState) -> dict[str, Any]:
    """The run's state after ``loop.step`` steps, by name: the model, the stage (optimizer, schedule, policy,
    pruning, estimation), the loop state (step, caps, scaler, history), the guard, the unreadable files, the RNG;
    ``config`` and ``batch_size`` let a resume refuse other settings and keep the batches."""
    return {"format": CHECKPOINT_FORMAT, "config": config.resume_key(run.precision),
            "batch_size": run.order.batch_size, "model": run.model.state_dict(), **stage.state_dict(),
            **loop.state_dict(), "guard": run.guard.state_dict() if run.guard else None,
            "bad_images": run.bad_images.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def _check_finite(model: torch.nn.Module, when: str) -> None:
    """NonFiniteError naming the first parameter of ``model`` that holds NaN or an infinity."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteError(f"training diverged: {name} holds NaN or infinite values {when} (lower --lr, or "
                                 "check the data and --weights)")


def _kept_checkpoint(run: Run) -> str:
    """Which checkpoint a diverged run keeps, in words."""
    found = checkpoints(run.run_dir)
    if not found:
        return "no checkpoint was written before it"
    step, path = found[0]
    return f"the last checkpoint, {path.name} (step {step}), written from finite weights, is kept"


def _save(config: TrainConfig, run: Run, stage: Stage, loop: LoopState, emit: Callable[[dict], None]) -> None:
    """Checkpoint after ``loop.step`` steps: never from non-finite weights (NonFiniteError), so the newest
    checkpoint is always one to resume; a full disk is a DiskFullError (the earlier checkpoints are kept)."""
    _check_finite(run.model, f"at the checkpoint after step {loop.step}")
    try:
        path = save_checkpoint(run.run_dir, loop.step, _checkpoint(config, run, stage, loop), key=run.device_key)
        emit({"event": "checkpoint", "step": loop.step, "path": str(path)})
    except OSError as e:  # e.g. an I/O error: the previous checkpoint is untouched, training goes on
        emit({"event": "warning", "message": f"checkpoint at step {loop.step} not written ({e}); "
                                              "the previous checkpoint is kept"})


# -------------------------------------------------------------------------------------------- summary and export
def _summary(config: TrainConfig, run: Run, stage: Stage, loop: LoopState, val_accuracy: float | None,
             val_loss: float | None, pruned: dict | None, peaks: PeakTracker, train_peak: int) -> dict[str, Any]:
    """``summary.json`` of a finished run (``run.model`` saved, adapters merged)."""
    history, memory_plan = loop.history, run.plan
    summary = {
        "edge_alast_version": __version__,
        "method": config.method,
        "model": config.model,
        "profile": run.profile.name if run.profile else None,
        "device": run.device,
        "precision": run.precision,
        "allocator": allocator_in_use(),
        "batch_size": run.order.batch_size,
        "img_size": config.img_size,
        "lr": config.lr,
        "lr_source": getattr(config, "lr_source", "given"),  # "method default" when --lr was not given
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
        **_flop_rate(run, history),
        "budgets": list(stage.policy.budgets),
        "trainable_params": stage.trainable_params,
        "base_params": sum(p.numel() for p in run.model.parameters()),
        "base_params_original": run.base_params,
        "pruning": pruned,
        "memory_ceiling_bytes": memory_plan.memory_ceiling_bytes if memory_plan else None,
        "predicted_peak_bytes": memory_plan.predicted_peak_bytes if memory_plan else None,  # the whole process
        "predicted_train_peak_bytes": memory_plan.predicted_train_peak_bytes if memory_plan else None,
        "flop_ceiling_per_step": memory_plan.flop_ceiling_per_step if memory_plan else None,
        "predicted_flops_per_step": memory_plan.predicted_flops_per_step if memory_plan else None,
        "planner_notes": list(memory_plan.notes) if memory_plan else [],
        "alast_update": run.alast.update if run.spec.alast else None,
        "compile": {"on": run.compile, "reason": run.compile_reason,
                    "graphs": stage.compiled.graphs if stage.compiled is not None else 0},
        "baseline": run.baseline,
        SCHEDULE: _alast_schedule(run),
        "classes": run.classes,
        "warnings": run.warnings,
    }
    if run.device == "cuda":
        summary["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        summary["cuda_memory_cap_bytes"] = run.cuda_memory_cap_bytes  # the allocator's cap (profile's ceiling)
    return summary


def _alast_schedule(run: Run) -> dict | None:
    """What the ``static``/``random`` baselines read from an ALaST run (``--alast-from``: mean keep ratios, steps
    each block trained, FLOPs per step), kept in the summary so that it outlives ``metrics.jsonl``; None for other
    methods, or where the step lines hold no one-depth per-block keep ratios."""
    if not run.spec.alast:
        return None
    steps = [r for r in read_metrics(run.run_dir / METRICS_FILE)
             if r.get("event") == "step" and isinstance(metric(r, "plan/keep_ratio"), list)]
    try:
        return schedule_of(steps) if steps else None
    except ConfigError:  # e.g. a depth that changed between stages
        return None


def _flop_rate(run: Run, history: dict[str, list]) -> dict[str, Any]:
    """How close the run came to the machine: training FLOP/s over the steady steps (forward + backward counted by
    the FLOP model; data loading and the optimizer inside the step's time) and their share of the reference rate."""
    from ..device.profiles import reference_flops

    seconds, flops = steady(history["step_seconds"]), steady(history["step_flops"])
    achieved = sum(flops) / sum(seconds) if sum(seconds) > 0 else None
    reference, source = reference_flops(run.profile, run.precision, run.device)
    return {"train_flops_per_second": achieved, "reference_flops_per_second": reference,
            "reference_flops_source": source,
            "flop_utilization": achieved / reference if achieved is not None and reference else None}


def _export(config: TrainConfig, summary: dict[str, Any], peaks: PeakTracker, emit: Callable[[dict], None]) -> None:
    """``model.onnx`` + ``manifest.json`` from the saved model, parity-checked in onnxruntime; the export's memory
    joins ``summary`` (rewritten). Call with the training state freed."""
    from ..deploy.export import export_run

    trim_heap()
    before_export = rss_bytes()
    peaks.interval_peak()
    manifest = export_run(config.out)
    emit({"event": "export", "path": str(Path(config.out) / "model.onnx"), "sha256": manifest.get("sha256")})
    summary.update(rss_before_export_bytes=before_export, export_peak_rss_bytes=peaks.interval_peak())
    summary["peak_rss_bytes"] = peaks.lifetime_peak()
    atomic_write_json(Path(config.out) / "summary.json", summary)
