"""Time-to-accuracy: does ALaST's adaptation earn its keep against full fine-tuning and simpler schedules?

Each method trains in its own ``edge-alast train`` process with ``--eval-every N`` (a fixed validation subset),
until its validation accuracy plateaus (no gain of ``--min-gain`` points over ``--patience`` evaluations; the run
is then stopped with SIGTERM, which checkpoints and exits 75) or ``--max-steps``. From the ``eval`` lines (each
carrying the cumulative training seconds and FLOPs) it reports, per method and data set, mean +- std over seeds:

* final (best) validation accuracy on the subset,
* training seconds and FLOPs to reach full fine-tuning's final accuracy - 1 point (``-`` when never reached),
* peak RSS.

The static and random baselines are built from each seed's ALaST run of the same settings (``--alast-from``), at
its FLOPs per step (edge_alast/alast/baselines.py). Data sets: Fashion-MNIST (``apt-get install dataset-fashion-mnist``)
and scikit-learn's ``load_digits`` (ships offline), both written as ImageFolders. Embeddings: frozen for every
method (``full`` included, ``--no-train-embeddings``), so full and ALaST differ only in what ALaST does.

    python tools/bench_tta.py --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors \\
        --img-size 112 --seeds 0,1,2 --datasets fmnist,digits --out runs/tta
    python tools/bench_tta.py --markdown runs/tta/results.json   # the tables again, from the results file
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from edge_alast.config import LightPeftConfig  # noqa: E402
from edge_alast.runfolder import METRICS_FILE, read_metrics  # noqa: E402

# name -> run-file settings on top of the common ones; "{alast_run}" is the seed's ALaST (relative) run folder.
METHODS = {
    "full": {"method": "full", "train_embeddings": False},
    "head": {"method": "head", "lr": 1e-3},  # a linear probe barely moves at 3e-5 (0.34-0.36 after 300 steps)
    "alast-reference": {"method": "alast", "alast": {"update": "reference"}},
    "alast-relative": {"method": "alast", "alast": {"update": "relative"}},
    "static": {"method": "alast", "alast": {"update": "static", "from_run": "{alast_run}"}},
    "random": {"method": "alast", "alast": {"update": "random", "from_run": "{alast_run}"}},
    "lora": {"method": "lora", "lr": 1e-3},
    "alast-lora": {"method": "alast-lora", "lr": 1e-3, "alast": {"update": "relative"}},
    "light-peft": {"method": "light-peft", "lr": 1e-3, "light_peft": {"estimation_steps": 40}},
    "light-peft+alast": {"method": "light-peft+alast", "lr": 1e-3, "light_peft": {"estimation_steps": 40},
                         "alast": {"update": "relative"}},
}


def write_digits(root: Path, val: int = 400, seed: int = 0) -> Path:
    """scikit-learn's 8x8 digits (1797 real scans) as PNG ImageFolders (train / val)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "val").exists():
        return root
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for rank, i in enumerate(order):
        split = "val" if rank < val else "train"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        img = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    return root


def write_fmnist(root: Path, train: int, val: int) -> Path:
    if not (root / "val").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_fashion_mnist.py"), str(root), "--train",
                        str(train), "--val", str(val)], check=True)
    return root


def counted(evals: list[dict], config: dict) -> list[dict]:
    """The evaluations of the model the run delivers: for Light-PEFT, those after its pruning (before it, the
    unpruned model is evaluated; its accuracy would otherwise count as the run's best and start the plateau
    clock, which then stops the run in the dip that follows pruning)."""
    if not str(config.get("method", "")).startswith("light-peft"):
        return evals
    pruned_at = int((config.get("light_peft") or {}).get("estimation_steps", LightPeftConfig().estimation_steps))
    return [e for e in evals if e["step"] > pruned_at]


def plateaued(evals: list[dict], patience: int, min_gain: float) -> bool:
    """No validation gain of ``min_gain`` over the best of the evaluations before the last ``patience``."""
    if len(evals) <= patience:
        return False
    before = max(e["val_accuracy"] for e in evals[:-patience])
    return max(e["val_accuracy"] for e in evals[-patience:]) < before + min_gain


def run(config: dict, out: Path, patience: int, min_gain: float) -> dict:
    """Train until plateau or max steps; the run's eval curve, peak and how it ended (kept in ``OUT.json``: a
    rerun of the benchmark with the same settings skips the runs already done)."""
    done = out.with_suffix(".json")
    if done.exists():
        result = json.loads(done.read_text())
        if result.get("config") == config:
            return {**result, "evals": counted(result["evals"], config)}
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**config, "out": str(out)}))
    proc = subprocess.Popen([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    evals, stopped = [], False
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "eval" and "step" in event:
            evals.append(event)
            if not stopped and plateaued(counted(evals, config), patience, min_gain):
                proc.send_signal(signal.SIGTERM)
                stopped = True
    code = proc.wait()
    if code not in (0, 75):
        raise SystemExit(f"{out.name} failed ({code}):\n{proc.stderr.read()[-3000:]}")
    steps = [r for r in read_metrics(out / METRICS_FILE) if r.get("event") == "step"]
    result = {"config": config, "evals": evals, "stopped_at_plateau": stopped, "steps": len(steps),
              "peak_rss_bytes": max((r["mem/peak_rss_bytes"] for r in steps), default=None),
              "flops_per_step": sum(r["flops/step"] for r in steps) / max(1, len(steps)),
              "torch_threads": os.environ.get("OMP_NUM_THREADS")}
    done.write_text(json.dumps(result, indent=1))  # every evaluation; counted() picks the delivered model's
    return {**result, "evals": counted(evals, config)}


def time_to(evals: list[dict], target: float) -> tuple[float | None, float | None]:
    """(training seconds, FLOPs) at the first evaluation reaching ``target``."""
    hit = next((e for e in evals if e["val_accuracy"] >= target), None)
    return (hit["elapsed_seconds"], hit["flops_total"]) if hit else (None, None)


def mean_std(values: list[float | None], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    got = [v / scale for v in values if v is not None]
    if not got:
        return "-"
    missing = f" ({len(values) - len(got)} never)" if len(got) < len(values) else ""
    if len(got) == 1:
        return fmt.format(got[0]) + missing
    return f"{fmt.format(statistics.mean(got))} ± {fmt.format(statistics.stdev(got))}{missing}"


def markdown(stored: dict) -> str:
    """The tables of a ``results.json`` ("DATASET/METHOD" -> that method's runs, one per seed), one per data set.
    The setup line is read off the first run's config."""
    out = []
    for dataset in dict.fromkeys(key.split("/", 1)[0] for key in stored):
        methods = [key.split("/", 1)[1] for key in stored if key.split("/", 1)[0] == dataset]
        results = {name: stored[f"{dataset}/{name}"] for name in methods}
        first = results.get("full") or next(iter(results.values()))
        cfg, seeds = first[0]["config"], ",".join(str(r["config"]["seed"]) for r in first)
        full = results.get("full", [])
        target = (statistics.mean(max(e["val_accuracy"] for e in r["evals"]) for r in full) - 0.01) if full else None
        out.append(f"\n{dataset}: {cfg['model']} @ {cfg['img_size']}px, batch {cfg['batch_size']}, lr {cfg['lr']} "
                   f"(head, adapters 1e-3), eval every {cfg['eval_every']} steps on {cfg['eval_images']} images, "
                   f"seeds {seeds}; target = full's final accuracy - 1 pt = "
                   f"{target if target is None else round(target, 4)}\n")
        # like with like in time: each method's best accuracy within the training seconds of the shortest method
        totals = [statistics.mean(r["evals"][-1]["elapsed_seconds"] for r in runs) for runs in results.values()]
        at = min(totals) if totals else 0.0
        out.append(f"(acc @ {at:.0f} s: the best validation accuracy within the first {at:.0f} training seconds, the "
                   f"mean training time of the quickest method)\n")
        out.append(f"| method | final val acc | acc @ {at:.0f} s | steps | training s | time to target s | "
                   "FLOPs to target (TFLOP) | GFLOPs/step | peak RSS MiB |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for name, runs in results.items():
            finals = [max(e["val_accuracy"] for e in r["evals"]) for r in runs]
            within = [max((e["val_accuracy"] for e in r["evals"] if e["elapsed_seconds"] <= at + 1e-6), default=None)
                      for r in runs]
            to = [time_to(r["evals"], target) if target is not None else (None, None) for r in runs]
            out.append(f"| {name} | {mean_std(finals)} | {mean_std(within)} | "
                       f"{mean_std([r['steps'] for r in runs], fmt='{:.0f}')} | "
                       f"{mean_std([r['evals'][-1]['elapsed_seconds'] for r in runs], fmt='{:.0f}')} | "
                       f"{mean_std([t for t, _ in to], fmt='{:.0f}')} | "
                       f"{mean_std([f for _, f in to], 1e12, '{:.1f}')} | "
                       f"{mean_std([r['flops_per_step'] for r in runs], 1e9, '{:.1f}')} | "
                       f"{mean_std([r['peak_rss_bytes'] for r in runs], 2**20, '{:.0f}')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5,
                    help="lr for full and ALaST runs (head and adapter methods: 1e-3); at 3e-5 full converges "
                         "(the README's sweep)")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--min-gain", type=float, default=0.005)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="fmnist,digits")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train-images", type=int, default=2000, help="Fashion-MNIST training images")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-file key for every run")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tta")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help="print the tables of a results.json (OUT/results.json) and exit, running nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not args.weights:
        ap.error("--weights is required")

    args.out.mkdir(parents=True, exist_ok=True)
    data = {"fmnist": lambda: write_fmnist(args.out / "data-fmnist", args.train_images, 1000),
            "digits": lambda: write_digits(args.out / "data-digits")}
    methods = args.methods.split(",")
    if {"static", "random"} & set(methods) and "alast-relative" not in methods:
        methods.insert(0, "alast-relative")  # the baselines are built from it
    order = sorted(methods, key=lambda m: m in ("static", "random"))  # baselines after their ALaST run
    results: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets.split(","):
        root = data[dataset]()
        for seed in map(int, args.seeds.split(",")):
            for name in order:
                out = args.out / dataset / f"{name}-s{seed}"
                settings = json.loads(json.dumps(METHODS[name]).replace(
                    "{alast_run}", str(args.out / dataset / f"alast-relative-s{seed}")))
                config = {"data": str(root / "train"), "val_data": str(root / "val"), "model": args.model,
                          "weights": args.weights, "img_size": args.img_size, "batch_size": args.batch_size,
                          "lr": args.lr, "steps": args.max_steps, "seed": seed, "precision": "fp32",
                          "eval_every": args.eval_every, "eval_images": args.eval_images, "export": False,
                          "resume": False, "augment": "none", **settings}
                for item in args.set:
                    key, _, value = item.partition("=")
                    config[key] = yaml.safe_load(value)
                print(f"{dataset} seed {seed}: {name} ...", file=sys.stderr, flush=True)
                results.setdefault((dataset, name), []).append(run(config, out, args.patience, args.min_gain))
    stored = {f"{d}/{m}": results[(d, m)] for d in args.datasets.split(",") for m in methods if (d, m) in results}
    (args.out / "results.json").write_text(json.dumps(stored, indent=1))
    print(markdown(stored))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
