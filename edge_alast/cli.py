"""``edge-alast`` command line.

Exit codes: 0 done, 1 unexpected failure, 2 usage/configuration error, 3 data error, 75 interrupted and
resumable (SIGTERM/SIGINT: the current step finishes, a checkpoint is written, running the same command resumes).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import click

from .cli_export import export, predict, train_ort
from .cli_profiles import profiles
from .errors import ConfigError, EdgeAlastError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATA, EXIT_INTERRUPTED = 0, 1, 2, 3, 75


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-alast")
def main() -> None:
    """Fine-tune timm Vision Transformers on edge devices with ALaST adaptive layer selection."""


main.add_command(profiles)
main.add_command(export)
main.add_command(predict)
main.add_command(train_ort)


def _load_run_file(path: str | None) -> dict:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def sd_notify(message: str) -> bool:
    """Send a status line to systemd when run as a ``Type=notify`` service (``NOTIFY_SOCKET`` set).

    The protocol is one datagram to a Unix socket (a leading ``@`` means the abstract namespace).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def _block_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated block indices, got {value!r}",
                                 param_hint="--recompute-blocks") from None


class _Printer:
    """JSON lines on stdout (for journald and daemons) or a one-line progress display on a terminal; a status
    line to systemd when ``NOTIFY_SOCKET`` is set."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self._t0 = None

    def __call__(self, event: dict) -> None:
        self._notify(event)
        if self.as_json:
            click.echo(json.dumps(event, default=str))
            return
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
        elif kind == "eval":
            acc = event["val_accuracy"]
            click.echo(f"\nval accuracy {acc:.4f}" if acc is not None else "\nno validation images")
        elif kind == "done":
            click.echo(f"done: {event['steps']} steps, {event['mean_step_seconds']:.3f} s/step, "
                       f"peak RSS {event['peak_rss_bytes'] / 2**20:.0f} MiB")

    @staticmethod
    def _notify(event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            sd_notify(f"READY=1\nSTATUS=training {event['model']} ({event['method']}), step "
                      f"{event['resumed_from_step']}/{event['steps']}")
        elif kind == "step" and (event["step"] % 10 == 0 or event["step"] == event["steps"]):
            sd_notify(f"STATUS=step {event['step']}/{event['steps']} loss {event['loss']:.4f}")
        elif kind in ("done", "interrupted"):
            sd_notify(f"STOPPING=1\nSTATUS={kind}")


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag the trainer polls after each step (the step in flight finishes first)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@main.command(context_settings={"show_default": True})
@click.option("--data", type=str, help="Training images: ImageFolder root (one sub-folder per class).")
@click.option("--val-data", type=str, help="Validation ImageFolder; default: a seeded split of --data.")
@click.option("--model", type=str, help="timm model name.  [default: vit_small_patch14_dinov2]")
@click.option("--weights", type=str, help="Local weights file (.safetensors or a torch state_dict).")
@click.option("--img-size", type=int, help="Input side in pixels.  [default: 224]")
@click.option("--profile", type=str, help="Device profile: shipped name, 'auto', or a YAML path.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override the profile's device.")
@click.option("--method", type=click.Choice(["alast", "full", "head", "lora", "alast-lora", "light-peft",
                                            "light-peft+alast"]),
              help="Fine-tuning method.  [default: alast]")
@click.option("--lora-r", type=int, help="LoRA rank (LoRA and Light-PEFT methods).  [default: 8]")
@click.option("--lora-alpha", type=float, help="LoRA scaling numerator (update = alpha/r * BA).  [default: 16]")
@click.option("--lora-dropout", type=float, help="Dropout on the adapters' input.  [default: 0]")
@click.option("--lora-targets", type=str, help="Comma-separated Linears of each block to adapt.  [default: qkv,proj,fc1,fc2]")
@click.option("--estimation-steps", type=int,
              help="Light-PEFT: steps of early estimation before pruning (part of --steps).  [default: 200]")
@click.option("--epochs", type=float, help="Epochs to train (alternative to --steps).")
@click.option("--steps", type=int, help="Optimizer steps to train.")
@click.option("--batch-size", type=int, help="Batch size; default: the profile's (16 without one).")
@click.option("--lr", type=float, help="Learning rate.  [default: 3e-05]")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), help="LR schedule.  [default: constant]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
              help="Autocast precision; default: the profile's (fp32 without one).")
@click.option("--seed", type=int, help="Seed for data order, splits, init and layer sampling.  [default: 0]")
@click.option("--out", type=str, help="Run folder to write (metrics.jsonl, summary.json, ...).")
@click.option("--resume/--no-resume", default=None,
              help="Resume from the run folder's checkpoint (default: automatically when it holds one of the same "
                   "settings); --no-resume starts over, discarding them.")
@click.option("--checkpoint-every-seconds", type=float, help="Checkpoint interval in seconds.  [default: 300]")
@click.option("--checkpoint-every-steps", type=int, help="Also checkpoint every N steps.")
@click.option("--export/--no-export", default=None,
              help="Export model.onnx + manifest.json at the end (parity-checked in onnxruntime).  [default: on]")
@click.option("--max-bad-fraction", type=float,
              help="Fail (exit 3) when more than this share of image files is unreadable.  [default: 0.5]")
@click.option("--freeze-below", type=int, help="Blocks below this index never train (store no activations).")
@click.option("--recompute-blocks", type=str, callback=lambda ctx, param, v: _block_list(v),
              help="Comma-separated block indices whose activations are recomputed in backward (e.g. 0,1).")
@click.option("--config", "config_file", type=str, help="YAML run file whose keys mirror these options.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when stdout is not a terminal).")
def train(config_file, as_json, **options):
    """Fine-tune a timm ViT on an image folder.

    \b
    Example:
      edge-alast train --data imgs/train --val-data imgs/val \\
        --weights vit_small_patch14_dinov2.safetensors --profile laptop_cpu --steps 80 --out runs/a
    """
    from .config import TrainConfig
    from .trainer import train as run_training

    as_json = as_json or not sys.stdout.isatty()
    printer = _Printer(as_json)
    try:
        values = _load_run_file(config_file)
        nested = {"lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
                  "lora_targets": ("lora", "targets"), "estimation_steps": ("light_peft", "estimation_steps")}
        for option, (section, key) in nested.items():
            value = options.pop(option)
            if value is not None:
                if option == "lora_targets":
                    value = [t.strip() for t in value.split(",") if t.strip()]
                values.setdefault(section, {})
                if not isinstance(values[section], dict):
                    raise ConfigError(f"{config_file}: {section} must be a mapping")
                values[section][key] = value
        values.update({k: v for k, v in options.items() if v is not None})
        for required in ("data", "out"):
            if not values.get(required):
                raise ConfigError(f"--{required} is required (on the command line or in --config)")
        config = TrainConfig.from_dict(values, source=config_file or "options")
        with _StopOnSignal() as stop:
            result = run_training(config, on_event=printer, should_stop=stop)
    except EdgeAlastError as e:
        _fail(printer, e, e.exit_code)
    except ValueError as e:  # a bad value found by a validator below the CLI
        _fail(printer, e, EXIT_USAGE)
    except Exception as e:  # noqa: BLE001 - nobody reads a traceback on a device: one line, exit 1
        if os.environ.get("EDGE_ALAST_DEBUG"):
            raise
        _fail(printer, RuntimeError(f"unexpected {type(e).__name__}: {e} (EDGE_ALAST_DEBUG=1 for a traceback)"),
              EXIT_FAILURE)
    sys.exit(EXIT_INTERRUPTED if result.summary.get("interrupted") else EXIT_OK)


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="ImageFolder to evaluate on (class folders named as in training).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def eval_command(run_dir, data, batch_size, as_json):
    """Evaluate a finished run's model (all tokens) on an image folder.

    \b
    Example:
      edge-alast eval runs/a --data imgs/test
    """
    try:
        from .data import Preprocess
        from .export import load_run_model
        from .images import scan_image_folder, scan_warnings
        from .trainer import evaluate

        model, meta = load_run_model(run_dir)
        folder = scan_image_folder(data, classes=meta["classes"], option="--data")
        for w in scan_warnings(folder, "--data"):
            click.echo(f"warning: {w}", err=True)
        preprocess = Preprocess(meta["img_size"], tuple(meta["mean"]), tuple(meta["std"]), meta["interpolation"])
        accuracy, loss = evaluate(model, folder.samples, preprocess, batch_size, "cpu")
    except EdgeAlastError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    result = {"run_dir": str(run_dir), "data": str(data), "images": len(folder.samples), "accuracy": accuracy,
              "loss": loss}
    click.echo(json.dumps(result) if as_json else
               f"accuracy {accuracy:.4f}  loss {loss:.4f}  on {len(folder.samples)} images")


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-class", type=int, default=48, show_default=True, help="Training images per class.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(out, per_class, size, seed):
    """Write the built-in demo dataset (synthetic shapes) to OUT/train and OUT/val.

    \b
    Example:
      edge-alast demo-data runs/demo-data && edge-alast train --data runs/demo-data/train \\
        --val-data runs/demo-data/val --profile laptop_cpu --steps 40 --out runs/demo
    """
    from .demo import write_demo_dataset

    root = write_demo_dataset(out, per_class=per_class, size=size, seed=seed)
    click.echo(f"wrote {root}/train and {root}/val")


def _fail(printer: _Printer, error: Exception, code: int) -> None:
    if printer.as_json:
        click.echo(json.dumps({"event": "error", "exit_code": code, "message": str(error)}))
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
