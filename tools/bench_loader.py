"""Benchmark of the training loader: step time with and without background decoding on camera-sized JPEGs against
small PNGs of the same images, and what training augmentation gains in a small-data setting.

(a) ``--part steps``: ``tools/bench_images.py``'s generator writes ``--count`` photo-like JPEGs of 2-4 MP (about a
    third stored in sensor orientation with an EXIF tag) and the same images, upright, as PNGs with a 256 px short
    side; the trainer (``python -m edge_alast.cli.main train ... --json --no-export``, one process per row) fine-tunes
    ViT-S at 224 px, batch 16, for ``--steps`` steps on each, with ``--loader-threads 0`` (decoding inside the step)
    and with the default background loader. Reported: median step seconds after ``--warmup`` steps (the trainer's
    ``time/step_seconds``: from the step's start to the end of its optimizer step, loading included).
(b) ``--part augment``: Fashion-MNIST, ``--per-class`` training images per class (``tools/make_fashion_mnist.py``),
    1000 validation images, ViT-S at 112 px, ``--aug-steps`` steps, lr 1e-4, batch 16, for each ``--augment`` choice
    and each seed; reported: validation accuracy, mean and sample standard deviation over the seeds.

Prints markdown tables (and writes the raw rows as JSON with ``--json-out``)::

    .venv/bin/python tools/bench_loader.py --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors \\
        --json-out runs/loader.json
    .venv/bin/python tools/bench_loader.py --markdown runs/loader.json   # the tables again, running nothing
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from bench_images import generate  # noqa: E402
from edge_alast.runfolder import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics  # noqa: E402


def train(cfg: dict, workdir: Path, name: str) -> dict:
    """One training process; returns its summary, step seconds and wall time."""
    out = workdir / name
    cfg = {**cfg, "out": str(out), "export": False}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = read_json(out / SUMMARY_FILE)
    seconds = [r["time/step_seconds"] for r in read_metrics(out / METRICS_FILE) if r.get("event") == "step"]
    warnings = [json.loads(x)["message"] for x in proc.stdout.splitlines() if '"warning"' in x]
    return {"name": name, "summary": summary, "step_seconds": seconds, "wall_seconds": wall, "warnings": warnings}


def part_steps(args, workdir: Path) -> list[dict]:
    root = workdir / "images"
    t = time.perf_counter()
    info = generate(root, args.count, 256, args.seed)
    print(f"generated {args.count} JPEGs ({info['tagged']} EXIF-rotated) and PNGs in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    val = workdir / "val"  # a few images: evaluation is not what is measured
    for cls in sorted(p.name for p in (root / "png").iterdir()):
        (val / cls).mkdir(parents=True)
        first = sorted((root / "png" / cls).iterdir())[0]
        shutil.copy(first, val / cls / first.name)
    runs = []
    for repeat in range(args.repeat):  # round robin: a disturbance of the machine hits one run of a row, not all
        for augment in args.step_augments:
            for threads in (0, None):
                for kind in ("jpeg", "png"):
                    cfg = {"data": str(root / kind), "val_data": str(val), "model": args.model,
                           "weights": args.weights, "img_size": 224, "batch_size": 16, "steps": args.steps,
                           "lr": 3e-5, "seed": 0, "augment": augment, "precision": "fp32"}
                    if threads is not None:
                        cfg["loader_threads"] = threads
                    name = f"steps-{kind}-{augment}-{'sync' if threads == 0 else 'prefetch'}-{repeat}"
                    run = train(cfg, workdir, name)
                    steady = run["step_seconds"][args.warmup:]
                    run.update(kind=kind, augment=augment, prefetch=threads is None,
                               median=statistics.median(steady), mean=statistics.fmean(steady))
                    print(f"{name}: median {run['median']:.3f} s, mean {run['mean']:.3f} s, "
                          f"wall {run['wall_seconds']:.0f} s", file=sys.stderr)
                    runs.append(run)
    rows = []  # per row, the run with the lowest median (the least disturbed), with all medians kept
    for key in dict.fromkeys((r["kind"], r["augment"], r["prefetch"]) for r in runs):
        same = [r for r in runs if (r["kind"], r["augment"], r["prefetch"]) == key]
        best = min(same, key=lambda r: r["median"])
        rows.append({**best, "medians": [r["median"] for r in same]})
    return rows


def part_augment(args, workdir: Path) -> list[dict]:
    data = workdir / "fmnist"
    subprocess.run([sys.executable, str(TOOLS / "make_fashion_mnist.py"), str(data), "--train",
                    str(args.per_class * 10), "--val", "1000"], check=True, capture_output=True)
    rows = []
    for augment in args.augments:
        for seed in args.seeds:
            cfg = {"data": str(data / "train"), "val_data": str(data / "val"), "model": args.model,
                   "weights": args.weights, "img_size": 112, "batch_size": 16, "steps": args.aug_steps, "lr": 1e-4,
                   "seed": seed, "augment": augment, "precision": "fp32"}
            row = train(cfg, workdir, f"aug-{augment}-{seed}")
            row.update(augment=augment, seed=seed, val_accuracy=row["summary"]["val_accuracy"])
            print(f"{row['name']}: val acc {row['val_accuracy']:.4f}, wall {row['wall_seconds']:.0f} s",
                  file=sys.stderr)
            rows.append(row)
    return rows


def steps_table(rows: list[dict], setup: dict) -> str:
    lines = [f"\n(a) step seconds, ViT-S/14 ({setup['model']}), 224 px, batch 16, alast, fp32, {setup['steps']} steps, "
             f"median and mean after {setup['warmup']}, the run with the lower median of {setup['repeat']}; "
             f"{setup['cpus']} CPUs\n",
             "| images | augment | decoding | step s (median) | step s (mean) | × PNG, same loader | "
             "medians of all runs |",
             "|---|---|---|---:|---:|---:|---|"]
    ref = {(r["augment"], r["prefetch"]): r["median"] for r in rows if r["kind"] == "png"}
    for r in rows:
        where = "background (default)" if r["prefetch"] else "in the step (`--loader-threads 0`)"
        label = "JPEG 2–4 MP" if r["kind"] == "jpeg" else "PNG, short side 256"
        lines.append(f"| {label} | {r['augment']} | {where} | {r['median']:.3f} | {r['mean']:.3f} | "
                     f"{r['median'] / ref[(r['augment'], r['prefetch'])]:.2f} | "
                     f"{', '.join(f'{m:.3f}' for m in r['medians'])} |")
    return "\n".join(lines)


def augment_table(rows: list[dict], setup: dict) -> str:
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    lines = [f"\n(b) Fashion-MNIST, {setup['per_class']} training images per class, 1000 val images, ViT-S/14 at "
             f"112 px, alast, {setup['aug_steps']} steps, batch 16, lr 1e-4; seeds {', '.join(map(str, seeds))}\n",
             "| --augment | val acc (mean ± std) | per seed | val loss (mean ± std) | per seed |",
             "|---|---|---|---|---|"]

    def spread(values):
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    for augment in dict.fromkeys(r["augment"] for r in rows):
        accs = [r["val_accuracy"] for r in rows if r["augment"] == augment]
        losses = [r["summary"]["val_loss"] for r in rows if r["augment"] == augment]
        lines.append(f"| {augment} | {spread(accs)} | {', '.join(f'{a:.3f}' for a in accs)} | {spread(losses)} | "
                     f"{', '.join(f'{v:.3f}' for v in losses)} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The tables of a ``--json-out`` file: (a) step times, (b) augmentation, whichever parts ran."""
    parts = [steps_table(results["steps"], results["setup"]) if results.get("steps") else "",
             augment_table(results["augment"], results["setup"]) if results.get("augment") else ""]
    return "\n".join(filter(None, parts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--part", choices=("steps", "augment", "both"), default="both")
    ap.add_argument("--count", type=int, default=200, help="(a) generated images of each kind")
    ap.add_argument("--steps", type=int, default=15, help="(a) training steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="(a) first steps left out of the median")
    ap.add_argument("--repeat", type=int, default=2, help="(a) runs of each row; the lowest median is reported")
    ap.add_argument("--step-augments", type=lambda s: s.split(","), default=["none"],
                    help="(a) comma-separated --augment values to time")
    ap.add_argument("--per-class", type=int, default=20, help="(b) training images per class")
    ap.add_argument("--aug-steps", type=int, default=60, help="(b) training steps per run")
    ap.add_argument("--augments", type=lambda s: s.split(","), default=["none", "flip", "rrc-flip"])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="(a) image generator seed")
    ap.add_argument("--workdir", type=Path, help="kept; default: a temporary folder, removed")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the tables of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if not args.weights:
        ap.error("--weights is required")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        steps = part_steps(args, workdir) if args.part in ("steps", "both") else []
        augment = part_augment(args, workdir) if args.part in ("augment", "both") else []
        setup = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
                 "cpus": os.cpu_count(), "per_class": args.per_class, "aug_steps": args.aug_steps}
        results = {"setup": setup, "steps": steps, "augment": augment}
        print(markdown(results))
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, default=str))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
