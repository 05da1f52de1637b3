"""``edge-alast``: the command group, and the ``train``, ``eval`` and ``demo-data`` commands.

The other commands live beside this module, one module per area (``deploy``, ``fleet``, ``profiles``,
``report``); options and run files are :mod:`.options`, exit codes and signal handling :mod:`.common`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from ..errors import ConfigError, DataError, EdgeAlastError
from .common import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EventPrinter, FinishOnSignal, StopOnSignal,
                     fail, sd_notify)
from .deploy import export, predict, train_ort
from .doctor import doctor
from .fleet import fleet
from .options import config_options, load_run_file, merge_options
from .profiles import profiles
from .report import report
from .store import store, update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-alast")
def main() -> None:
    """Fine-tune timm Vision Transformers on edge devices with ALaST adaptive layer selection."""


main.add_command(profiles)
main.add_command(export)
main.add_command(predict)
main.add_command(train_ort)
main.add_command(report)
main.add_command(fleet)
main.add_command(doctor)
main.add_command(update)
main.add_command(store)


class _Printer(EventPrinter):
    """JSON lines on stdout (for journald and daemons) or a one-line progress display on a terminal; a status
    line to systemd when ``NOTIFY_SOCKET`` is set."""

    def __init__(self, as_json: bool):
        super().__init__(as_json)
        self._t0 = None

    def show(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            click.echo(f"training {event['model']} ({event['method']}, {event['precision']} on {event['device']}) "
                       f"for {event['steps']} steps, batch {event['batch_size']}, "
                       f"{event['train_images']} train / {event['val_images']} val images -> {event['run_dir']}")
        elif kind == "step":
            tokens = event["tokens/per_block"]
            if self._t0 is None:
                self._t0 = (time.monotonic(), event["step"] - 1)
            t_start, s_start = self._t0
            rate = (time.monotonic() - t_start) / max(1, event["step"] - s_start)
            eta = rate * (event["steps"] - event["step"])
            width, done = 24, event["step"] / event["steps"]
            bar = "#" * int(width * done) + "-" * (width - int(width * done))
            click.echo(f"\r[{bar}] {event['step']}/{event['steps']}  loss {event['loss']:.4f}  "
                       f"tokens {tokens[0]}->{tokens[-1]}  ETA {int(eta) // 60}:{int(eta) % 60:02d} ", nl=False)
        elif kind == "interrupted":
            click.echo(f"\ninterrupted after step {event['steps']}: checkpoint written; run the same command to resume")
        elif kind == "warning":
            click.echo(f"\nwarning: {event['message']}", err=True)
        elif kind == "anneal":
            click.echo(f"\nplateau after step {event['step']}: annealing keep ratios to 1, finishing at step "
                       f"{event['until']}")
        elif kind == "finish":
            why = {"plateau": "the validation curve plateaued", "budget": "the --max-tflops budget is spent",
                   "signal": "SIGUSR1"}.get(event.get("reason"), event.get("reason"))
            click.echo(f"\nfinishing after step {event['step']} of {event['steps']}: {why}")
        elif kind == "eval":
            acc = event["val_accuracy"]
            click.echo(f"\nval accuracy {acc:.4f}" if acc is not None else "\nno validation images")
        elif kind == "done":
            click.echo(f"done: {event['steps']} steps, {event['mean_step_seconds']:.3f} s/step, "
                       f"peak RSS {event['peak_rss_bytes'] / 2**20:.0f} MiB")

    def notify(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            sd_notify(f"READY=1\nSTATUS=training {event['model']} ({event['method']}), step "
                      f"{event['resumed_from_step']}/{event['steps']}")
        elif kind == "step" and (event["step"] % 10 == 0 or event["step"] == event["steps"]):
            sd_notify(f"STATUS=step {event['step']}/{event['steps']} loss {event['loss']:.4f}")
        elif kind in ("done", "interrupted"):
            sd_notify(f"STOPPING=1\nSTATUS={kind}")


def _use_allocator(config_file: str | None, options: dict) -> str | None:
    """Run on the allocator that ``--allocator`` (or the run file's ``allocator``, default ``auto``) asks for:
    re-execute this process once with ``LD_PRELOAD`` (:func:`edge_alast.device.allocator.reexec_with_allocator`) when it
    was started as ``edge-alast train`` / ``python -m edge_alast.cli train``; never inside another program (click's
    test runner, a script calling :func:`main`). Returns a warning when the allocator asked for cannot be had."""
    from ..device.allocator import CHOICES, allocator_in_use, reexec_with_allocator

    choice = options.get("allocator")
    if choice is None:
        try:
            choice = load_run_file(config_file).get("allocator")
        except ConfigError:
            choice = None  # reported when the run file is read for the run
    choice = choice or "auto"
    if choice not in CHOICES:
        return None  # TrainConfig.validate names the bad value
    started_as_cli = (Path(sys.argv[0]).name == "edge-alast"
                      or Path(sys.argv[0]).resolve() == (Path(__file__).parent / "__main__.py").resolve())
    if started_as_cli:
        return reexec_with_allocator(choice)
    current = allocator_in_use()
    if choice not in ("auto", current) and not (choice == "glibc" and current.startswith("glibc")):
        return f"--allocator {choice}: cannot switch inside this program, running on {current}"
    return None


@main.command()
@config_options
@click.option("--config", "config_file", type=str, help="YAML run file whose keys mirror these options.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when stdout is not a terminal).")
def train(config_file, as_json, **options):
    """Fine-tune a timm ViT on an image folder.

    \b
    Example:
      edge-alast train --data imgs/train --val-data imgs/val \\
        --weights vit_small_patch14_dinov2.safetensors --profile laptop_cpu --steps 80 --out runs/a
    """
    allocator_warning = _use_allocator(config_file, options)  # may re-execute this process, before torch loads
    from ..config import TrainConfig
    from ..training.trainer import train as run_training

    as_json = as_json or not sys.stdout.isatty()
    printer = _Printer(as_json)
    if allocator_warning:
        printer({"event": "warning", "message": allocator_warning})
    try:
        values = merge_options(config_file, options)
        for required in ("data", "out"):
            if not values.get(required):
                raise ConfigError(f"--{required} is required (on the command line or in --config)")
        config = TrainConfig.from_dict(values, source=config_file or "options")
        with StopOnSignal() as stop, FinishOnSignal() as finish:  # SIGUSR1: end here, keep the model (exit 0)
            result = run_training(config, on_event=printer, should_stop=lambda: stop() or printer.stdout_lost,
                                  should_finish=finish)
    except EdgeAlastError as e:
        fail(e, e.exit_code, printer.as_json)
    except ValueError as e:  # a bad value found by a validator below the CLI
        fail(e, EXIT_USAGE, printer.as_json)
    except Exception as e:  # noqa: BLE001 - nobody reads a traceback on a device: one line, exit 1
        if os.environ.get("EDGE_ALAST_DEBUG"):
            raise
        fail(RuntimeError(f"unexpected {type(e).__name__}: {e} (EDGE_ALAST_DEBUG=1 for a traceback)"), EXIT_FAILURE,
             printer.as_json)
    sys.exit(EXIT_INTERRUPTED if result.summary.get("interrupted") else EXIT_OK)


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="ImageFolder to evaluate on (class folders named as in training).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--train-view", is_flag=True,
              help="Drop tokens as ALaST training did: each block keeps its mean keep ratio over the run's steps "
                   "(metrics.jsonl), to measure the train/eval token mismatch. Default: every token.")
def eval_command(run_dir, data, batch_size, as_json, train_view):
    """Evaluate a finished run's model (all tokens) on an image folder.

    \b
    Example:
      edge-alast eval runs/a --data imgs/test
      edge-alast eval runs/a --data imgs/test --train-view
    """
    from contextlib import nullcontext

    keep_ratios = None
    try:
        from ..data.loader import Preprocess
        from ..runfolder import load_run_model
        from ..data.images import BadImages, scan_image_folder, scan_warnings
        from ..training.evaluate import evaluate
        from ..training.evaluate import train_view as token_view

        model, meta = load_run_model(run_dir)
        view = nullcontext()
        if train_view:
            from ..alast.baselines import mean_keep_ratios
            from ..config import COAUTHORS

            keep_ratios = mean_keep_ratios(run_dir, len(model.blocks), option="--train-view")
            alast = meta["config"].get("alast") or {}
            view = token_view(model, keep_ratios, count_prefix=alast.get("update") == COAUTHORS,
                              token_multiple=int(meta["config"].get("token_multiple") or 1))
        folder = scan_image_folder(data, classes=meta["classes"], option="--data")
        for w in scan_warnings(folder, "--data"):
            click.echo(f"warning: {w}", err=True)
        # The run's eval transform; files that fail to decode are left out and named, as in training.
        bad = BadImages(folder, option="--data")
        with view:
            accuracy, loss = evaluate(model, folder.samples, Preprocess.from_meta(meta), batch_size, "cpu", bad=bad,
                                      on_warning=lambda message: click.echo(f"warning: {message}", err=True))
        if accuracy is None:
            raise DataError(f"--data: none of the {len(folder.samples)} images in {data} is readable")
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    images = len(folder.samples) - len(bad.failures)
    skipped = [str(path) for path, _ in folder.skipped] + [path for path, _ in bad.failures]
    result = {"run_dir": str(run_dir), "data": str(data), "images": images, "accuracy": accuracy, "loss": loss,
              "skipped": skipped, "view": "train" if train_view else "all tokens"}
    if keep_ratios is not None:
        result["keep_ratios"] = [round(r, 6) for r in keep_ratios]
    click.echo(json.dumps(result) if as_json else
               f"accuracy {accuracy:.4f}  loss {loss:.4f}  on {images} images ({result['view']})")


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(min=1), default=48, show_default=True,
              help="Training images per class.")
@click.option("--size", type=click.IntRange(min=1, max=4096), default=64, show_default=True,
              help="Image side in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def demo_data(out, per_class, size, seed):
    """Write the built-in demo dataset (synthetic shapes) to OUT/train and OUT/val.

    \b
    Example:
      edge-alast demo-data runs/demo-data && edge-alast train --data runs/demo-data/train \\
        --val-data runs/demo-data/val --profile laptop_cpu --steps 40 --out runs/demo
    """
    from ..data.demo import write_demo_dataset

    root = write_demo_dataset(out, per_class=per_class, size=size, seed=seed)
    click.echo(f"wrote {root}/train and {root}/val")
