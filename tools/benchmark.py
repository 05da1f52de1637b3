"""Benchmark ALaST against full and head-only fine-tuning on the same data, model and seed.

Each method runs in its own ``edge-alast train`` process, so each peak RSS is that method's alone. Prints a table
with every figure and its ratio to ``full``; ``--json-out`` also writes the raw summaries.

    python tools/benchmark.py --data /tmp/fm/train --val-data /tmp/fm/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --steps 80

Extra ``--set key=value`` pairs go into every method's run file (``--set alast.k_trainable=6``); ``--method-set
METHOD[,METHOD]:key=value;key=value`` only into those methods' (``--method-set lora,alast-lora:lr=1e-3``);
``--variant NAME:key=value;key=value`` adds another ALaST row with those settings. With ``--export`` every run also
exports ONNX, and the table gains the model's size and onnxruntime batch-1 latency (from ``manifest.json``).
``--markdown FILE`` prints the table again from a ``--json-out`` file, running nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from edge_alast.runfolder import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics, steady

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tta import code_version  # noqa: E402  (the last commit touching edge_alast/, and whether it differs)


def parse_value(text: str):
    return yaml.safe_load(text)


def set_key(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def run_method(name: str, config: dict, workdir: Path) -> dict:
    run_dir = workdir / name
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({**config, "out": str(run_dir)}))
    cmd = [sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg_path), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict:
    """A run's summary plus the median steady-state step time (robust to a step disturbed by other work)."""
    summary = read_json(run_dir / SUMMARY_FILE)
    seconds = [s["time/step_seconds"] for s in read_metrics(run_dir / METRICS_FILE) if s.get("event") == "step"]
    summary["median_step_seconds"] = statistics.median(steady(seconds))
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        fp32 = json.loads(manifest.read_text())["formats"]["fp32"]
        summary["onnx_size_bytes"] = fp32["size_bytes"]
        summary["onnx_latency_ms_batch1"] = fp32["latency_ms_batch1"]
    return summary


def fmt_table(rows: list[tuple[str, dict]], reference: dict | None) -> str:
    cols = [("val acc", "val_accuracy", "{:.3f}", 1.0), ("step s (median)", "median_step_seconds", "{:.2f}", 1.0),
            ("step s (mean)", "mean_step_seconds", "{:.2f}", 1.0),
            ("peak RSS MiB", "peak_rss_bytes", "{:.0f}", 2**20), ("GFLOPs/step", "train_flops_per_step", "{:.0f}", 1e9),
            ("trainable params M", "trainable_params", "{:.3f}", 1e6), ("base params M", "base_params", "{:.2f}", 1e6)]
    if any("onnx_size_bytes" in s for _, s in rows):
        cols += [("ONNX MiB", "onnx_size_bytes", "{:.1f}", 2**20), ("ONNX b1 ms", "onnx_latency_ms_batch1", "{:.1f}", 1)]
    head = "| method | " + " | ".join(f"{c} | × full" if c != "val acc" else "val acc | Δ full (pts)" for c, *_ in cols) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(cols))]
    for name, s in rows:
        cells = [name]
        for _, key, fmt, scale in cols:
            v = s.get(key)
            cells.append(fmt.format(v / scale) if v is not None else "-")
            if reference is None or v is None or reference.get(key) in (None, 0):
                cells.append("-")
            elif key == "val_accuracy":
                cells.append(f"{100 * (v - reference[key]):+.1f}")
            else:
                cells.append(f"{v / reference[key]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup_line(setup: dict) -> str:
    """What the table was measured with: the settings, the allocator the runs used and the code version."""
    code = setup.get("code") or {}
    return (f"{setup['model']} @ {setup['img_size']}px, batch {setup['batch_size']}, {setup['steps']} steps, lr "
            f"{setup['lr']}, {setup['precision']}, seed {setup['seed']}, allocator {setup.get('allocator', '?')}; "
            f"settings: {json.dumps(setup['set'])}; per method: {json.dumps(setup['method_set'])}; measured at "
            f"`{(code.get('commit') or '?')[:7]}`{' + uncommitted changes' if code.get('dirty') else ''}")


def markdown(results: dict) -> str:
    """The table of a ``--json-out`` file (method -> summary, and ``_setup`` in files written since it was kept),
    ratios against ``full`` when it ran."""
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    table = fmt_table(list(rows.items()), rows.get("full"))
    return f"{setup_line(results['_setup'])}\n\n{table}" if "_setup" in results else table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="full,alast,head")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-file key for every method")
    ap.add_argument("--method-set", action="append", default=[], metavar="M[,M]:K=V;K=V",
                    help="run-file keys for the listed methods only")
    ap.add_argument("--export", action="store_true", help="export ONNX too; adds size and batch-1 latency columns")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V;K=V", help="extra ALaST row")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--table-only", action="store_true",
                    help="re-print the table from the run folders already in --workdir (no training)")
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.data and args.val_data):
        ap.error("--data and --val-data are required")

    base = {"data": args.data, "val_data": args.val_data, "model": args.model, "img_size": args.img_size,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision,
            "seed": args.seed, "export": bool(args.export)}
    if args.weights:
        base["weights"] = args.weights
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(base, key, parse_value(value))
    runs = [(m, json.loads(json.dumps({**base, "method": m}))) for m in args.methods.split(",") if m]
    for spec in args.method_set:
        names, _, pairs = spec.partition(":")
        for name, cfg in runs:
            if name in names.split(","):
                for pair in filter(None, pairs.split(";")):
                    key, _, value = pair.partition("=")
                    set_key(cfg, key, parse_value(value))
    for spec in args.variant:
        name, _, pairs = spec.partition(":")
        cfg = json.loads(json.dumps({**base, "method": "alast"}))
        for pair in filter(None, pairs.split(";")):
            key, _, value = pair.partition("=")
            set_key(cfg, key, parse_value(value))
        runs.append((name, cfg))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-alast-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    if args.table_only:
        runs, results = [], [(n, read_run(workdir / n)) for n, _ in runs if (workdir / n / SUMMARY_FILE).exists()]
    for name, cfg in runs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append((name, run_method(name, cfg, workdir)))
        print(f"  {name}: acc {results[-1][1]['val_accuracy']:.3f}, {results[-1][1]['mean_step_seconds']:.2f} s/step",
              file=sys.stderr, flush=True)
    allocators = sorted({str(s.get("allocator")) for _, s in results})
    setup = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
             "lr": args.lr, "precision": args.precision, "seed": args.seed, "set": args.set,
             "method_set": args.method_set, "allocator": ",".join(allocators), "code": code_version()}
    stored = {"_setup": setup, **{n: s for n, s in results}}
    print("\n" + markdown(stored))
    if args.json_out:
        args.json_out.write_text(json.dumps(stored, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
