"""``edge-alast export``, ``predict`` and ``train-ort``: deployment commands.

torch is imported only inside ``export`` (``predict`` and ``train-ort`` run where torch is not installed), so this
module imports nothing heavy at import time.
"""
from __future__ import annotations

import json
import sys

import click

from ..errors import EdgeAlastError
from .common import EXIT_DATA, fail
from .options import FiniteFloat

EXPORT_FORMATS = ("fp32", "fp16", "int8", "ort-training")


@click.command(context_settings={"show_default": True})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "formats", type=click.Choice(EXPORT_FORMATS), multiple=True, default=("fp32",),
              help="What to write (repeatable): fp32 model.onnx (always, with any of fp16/int8), fp16 or int8 "
                   "variants beside it, or ort-training artifacts in RUN_DIR/ort_training/.")
@click.option("--val-data", type=str, help="Validation ImageFolder for the parity check and accuracy "
                                           "(up to 32 images); default: the run's --val-data, else random inputs.")
@click.option("--opset", type=int, default=17, help="ONNX opset (onnxruntime 1.19 loads up to 21).")
@click.option("--trainable-fraction", type=FiniteFloat(min=0, max=1, min_open=True), default=0.25,
              help="ort-training: share of blocks that train (those with the highest average ALaST budget).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(run_dir, formats, val_data, opset, trainable_fraction, as_json):
    """Export a finished run for deployment: ONNX (checked against PyTorch in onnxruntime) and/or
    ONNX Runtime training artifacts.

    \b
    Writes RUN_DIR/model.onnx and RUN_DIR/manifest.json (sha256, parity, metadata); class names, input size and
    mean/std travel inside the ONNX file, so `edge-alast predict` needs nothing else.

    \b
    Examples:
      edge-alast export runs/a --val-data imgs/val --format fp32 --format int8
      edge-alast export runs/a --format ort-training
    """
    try:
        inference = [f for f in formats if f != "ort-training"]
        result = {}
        if inference:
            from ..deploy.export import export_run

            manifest = export_run(run_dir, val_data=val_data, formats=inference, opset=opset)
            result["manifest"] = manifest
            if not as_json:
                p = manifest["parity"]
                click.echo(f"wrote {run_dir}/{manifest['file']} ({manifest['size_bytes'] / 2**20:.1f} MiB, "
                           f"sha256 {manifest['sha256'][:12]}...); parity on {p['images']} {p['source']} inputs: "
                           f"max |diff| {p['max_abs_diff']:.2g}, argmax equal")
                for fmt, entry in manifest["formats"].items():
                    acc = f", accuracy {entry['accuracy']:.4f}" if "accuracy" in entry else ""
                    click.echo(f"  {fmt}: {entry['file']} {entry['size_bytes'] / 2**20:.1f} MiB, "
                               f"{entry['latency_ms_batch1']:.2f} ms/image{acc}")
        if "ort-training" in formats:
            from ..deploy.ort_training import generate_training_artifacts

            info = generate_training_artifacts(run_dir, trainable_fraction=trainable_fraction, opset=opset)
            result["ort_training"] = {k: v for k, v in info.items() if k != "requires_grad"}
            if not as_json:
                click.echo(f"wrote {run_dir}/ort_training/ (trainable blocks {info['trainable_blocks']} "
                           "+ final norm and head)")
        if as_json:
            click.echo(json.dumps(result, default=str))
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)


@click.command(context_settings={"show_default": True})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=int, default=5, help="Classes to show per image.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads; default: onnxruntime's choice.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              help="onnxruntime execution provider; auto: the best present (TensorRT, CUDA, CPU), with a warning "
                   "when it falls back to the CPU on a host with an NVIDIA GPU.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
def predict(model, images, top_k, threads, provider, as_json):
    """Classify images with an exported ONNX model (onnxruntime only; torch is not needed).

    An image that cannot be read gets an error line naming it (with --json: an object with "error"); the others
    are classified, and the exit code is 3.

    \b
    Example:
      edge-alast predict runs/a/model.onnx photo1.jpg photo2.png --top-k 3
    """
    from ..deploy.predict import predict as run_predict

    try:
        results = run_predict(model, images, top_k=top_k, threads=threads, provider=provider,
                              on_warning=lambda message: click.echo(f"warning: {message}", err=True))
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    failed = [r for r in results if "error" in r]
    for r in results:
        if as_json:
            click.echo(json.dumps(r))
        elif "error" in r:
            click.echo(f"error: {r['image']}: {r['error']}", err=True)
        else:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            click.echo(f"{r['image']}: {top}  [{r['provider']}]")
    if failed:  # every image was tried; the exit code says some could not be read
        sys.exit(EXIT_DATA)


@click.command("train-ort", context_settings={"show_default": True})
@click.option("--artifacts", required=True, type=str, help="ORT training folder (`edge-alast export --format "
                                                           "ort-training` writes RUN_DIR/ort_training).")
@click.option("--data", required=True, type=str, help="Training images: ImageFolder root.")
@click.option("--val-data", type=str, help="Validation ImageFolder; default: a seeded 20 % split of --data.")
@click.option("--steps", required=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16)
@click.option("--lr", type=FiniteFloat(min=0, max=1, min_open=True), default=1e-4,
              help="AdamW learning rate, in (0, 1].")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, help="Seed for the data order and split.")
@click.option("--out", required=True, type=str, help="Folder to write (metrics.jsonl, summary.json, model.onnx).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when stdout is not a terminal).")
def train_ort(artifacts, data, val_data, steps, batch_size, lr, seed, out, as_json):
    """Continue fine-tuning on the device with ONNX Runtime training (no torch needed).

    \b
    Writes OUT/metrics.jsonl, OUT/summary.json, OUT/checkpoint and OUT/model.onnx (for `edge-alast predict`).

    \b
    Example:
      edge-alast export runs/a --format ort-training
      edge-alast train-ort --artifacts runs/a/ort_training --data imgs/new --steps 50 --out runs/a-ort
    """
    from ..deploy.ort_training import train_ort as run_train_ort

    as_json = as_json or not sys.stdout.isatty()

    def show(event: dict) -> None:
        if as_json:
            click.echo(json.dumps(event, default=str))
        elif event["event"] == "start":
            click.echo(f"ORT training {event['model']} (blocks {event['trainable_blocks']} + head) for "
                       f"{event['steps']} steps, batch {event['batch_size']} -> {event['run_dir']}")
        elif event["event"] == "step":
            click.echo(f"\rstep {event['step']}  loss {event['loss']:.4f}  {event['time/step_seconds']:.2f}s/step",
                       nl=False)
        elif event["event"] == "eval":
            click.echo(f"\nval accuracy {event['val_accuracy']:.4f}")
        elif event["event"] == "done":
            click.echo(f"\ndone: {event['steps']} steps, {event['mean_step_seconds']:.3f} s/step")

    try:
        run_train_ort(artifacts, data, out, steps=steps, val_data=val_data, batch_size=batch_size, lr=lr,
                      seed=seed, on_event=show)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
